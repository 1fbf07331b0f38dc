//! `chatvault receipt ...`: checking an erasure receipt offline with the server's public
//! key alone, and fetching that key.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clap::Subcommand;
use serde_json::{Value, json};

use super::client::{Conn, status, subjects};
use crate::grpc::pb;
use crate::vault::{SignedReceipt, verify_receipt};

#[derive(Subcommand, Debug)]
pub enum ReceiptCommand {
    /// Check a receipt (the JSON `shred` or `delete` printed) with the server's public key.
    /// Needs no server: a data subject or a regulator can run it.
    Verify {
        /// File with the receipt-signing public key (64 hex characters), as `receipt key`
        /// writes it or the operator publishes it (`<key_dir>/receipt-signing.pub`).
        #[arg(long)]
        public_key: PathBuf,
        /// The receipt JSON file ("-" for standard input).
        receipt: PathBuf,
    },
    /// Fetch the public key receipts are signed with.
    Key {
        #[command(flatten)]
        conn: Conn,
        /// Write it to this file too.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// A signed receipt as printed: payload, base64 signature, key id.
pub fn signed_json(payload: &str, signature: &[u8], key_id: &str) -> Value {
    json!({ "payload": payload, "signature": STANDARD.encode(signature), "key_id": key_id })
}

pub async fn run(cmd: ReceiptCommand) -> Result<(), String> {
    let out = match cmd {
        ReceiptCommand::Verify { public_key, receipt } => verify(&public_key, &receipt)?,
        ReceiptCommand::Key { conn, out } => {
            let r = subjects(&conn).await?.get_receipt_key(pb::GetReceiptKeyRequest {}).await.map_err(status)?;
            let key = r.into_inner();
            if let Some(path) = out {
                std::fs::write(&path, format!("{}\n", key.public_key_hex))
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            json!({ "public_key_hex": key.public_key_hex, "key_id": key.key_id })
        }
    };
    println!("{}", serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?);
    Ok(())
}

fn verify(public_key: &Path, receipt: &Path) -> Result<Value, String> {
    let public = std::fs::read_to_string(public_key).map_err(|e| format!("{}: {e}", public_key.display()))?;
    let text = if receipt == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).map_err(|e| format!("standard input: {e}"))?
    } else {
        std::fs::read_to_string(receipt).map_err(|e| format!("{}: {e}", receipt.display()))?
    };
    let doc: Value = serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", receipt.display()))?;
    // The signed part: the whole document, or under "signed" (as `shred` prints it), or
    // under "receipt.signed" (as `delete` does).
    let signed = [&doc["receipt"]["signed"], &doc["signed"], &doc]
        .into_iter()
        .find(|v| v.get("payload").is_some())
        .ok_or_else(|| format!("{}: no signed receipt (payload, signature, key_id) in it", receipt.display()))?;
    let field = |name: &str| {
        signed[name].as_str().ok_or_else(|| format!("{}: receipt field {name:?} is missing", receipt.display()))
    };
    let signature = STANDARD.decode(field("signature")?).map_err(|_| "receipt field \"signature\" is not base64")?;
    let signed =
        SignedReceipt { payload: field("payload")?.to_owned(), signature, key_id: field("key_id")?.to_owned() };
    let payload = verify_receipt(&public, &signed).map_err(|e| format!("{}: {e}", receipt.display()))?;
    Ok(json!({ "verified": true, "receipt": payload }))
}
