//! `chatvault check`: what a stopped region's files hold, read without changing them.
//! Damage (a bad frame where writes were acknowledged, or followed by good frames) is
//! listed with its file and offset; a torn tail (a crash mid-write, never acknowledged) is
//! listed apart, since the next start cuts it off by itself.

use std::path::PathBuf;

use serde::Serialize;

use super::ServerError;
use crate::config::Config;
use crate::store::files::SegmentCheck;
use crate::store::{KvStore, SledStore};

#[derive(Debug, Serialize)]
pub struct Finding {
    pub file: PathBuf,
    pub offset: u64,
    pub what: String,
}

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub region: String,
    /// No damage found (torn tails do not count: nothing acknowledged is in them).
    pub ok: bool,
    pub damage: Vec<Finding>,
    pub torn: Vec<Finding>,
    pub value_segments: usize,
    pub audit_segments: usize,
    /// What to do about the damage listed.
    pub advice: Option<String>,
}

/// Checks the value log and the audit trail of the one region `config` names.
pub fn check(config: &Config) -> Result<CheckReport, ServerError> {
    let spec = super::restore::one_sled_region(config, "check")?;
    let data = &spec.data_dir;
    if !data.join("db").exists() {
        return Err(ServerError::Refused(format!("{} is not a chatvault data directory", data.display())));
    }
    // How far the value log was durable when writes were last acknowledged. sled is
    // locked while the server runs: the check is for a stopped region.
    // Held open to the end: a server cannot start on the region while it is checked.
    let store = SledStore::open(data, 16 << 20).map_err(|e| {
        ServerError::Refused(format!(
            "{}: cannot open the store: {e} (if a server runs on this region, stop it first)",
            data.display()
        ))
    })?;
    let (mut damage, mut torn) = (Vec::new(), Vec::new());
    // How far the log was durable when writes were last acknowledged, and whether the
    // index lost what the log holds: as the start decides it. An index behind its log is
    // no damage: the start replays the log into it.
    let mark = match crate::store::log_acknowledged(&store, &data.join("values"), false) {
        Ok(mark) => mark,
        Err(crate::store::StoreError::Damaged(why)) => {
            damage.push(Finding { file: data.join("db"), offset: 0, what: why });
            None
        }
        Err(e) => return Err(e.into()),
    };
    let values = crate::store::inspect_values(&data.join("values"))?;
    let newest = values.iter().filter_map(|s| crate::store::value_segment_id(&s.path)).max();
    if let (Some((seg, _)), Some(newest)) = (mark, newest)
        && seg > newest
    {
        damage.push(Finding {
            file: data.join("values"),
            offset: 0,
            what: format!("value-log segment {seg} is missing, and writes in it were acknowledged"),
        });
    }
    for (i, s) in values.iter().enumerate() {
        if s.valid >= s.len {
            continue;
        }
        let id = crate::store::value_segment_id(&s.path);
        let last = i + 1 == values.len();
        let lost = s.len - s.valid;
        // As serve decides: whole frames after a bad one count only where no mark is kept.
        let good_after = match config.durability {
            crate::store::Durability::Fsync => s.marked_after,
            _ => s.good_after,
        };
        let damaged = crate::store::values_tail_is_damage(mark, id.unwrap_or(0), s.valid, good_after);
        if last && !damaged {
            torn.push(finding(s, format!("a write cut short at the end ({lost} bytes, never acknowledged)")));
        } else {
            damage.push(finding(
                s,
                format!(
                    "damaged value-log frame: the {lost} bytes from here are unreadable, and they were acknowledged"
                ),
            ));
        }
    }
    // The index ahead of the log's end: a power loss kept sled's pages and cut the log's
    // unsynced tail. Never acknowledged; the next start drops what points past the end.
    if let (Some(applied), Some(last)) = (crate::store::log_applied_of(&store)?, values.last())
        && let Some(id) = crate::store::value_segment_id(&last.path)
        && applied > (id, last.valid)
        && damage.is_empty()
    {
        torn.push(finding(
            last,
            format!("the index holds writes past here, up to {applied:?}, that the log lost (never acknowledged)"),
        ));
    }
    let audit_mark = store.get(&crate::audit::audit_mark_key())?.and_then(|b| crate::audit::decode_audit_mark(&b));
    let audit = crate::audit::inspect_segments(&super::node::audit_dir(data))?;
    for (i, s) in audit.iter().enumerate() {
        if s.valid >= s.len {
            continue;
        }
        // A newest segment without its whole header is a crash at its creation (open
        // removes it); any other bad record at the end with nothing good after is torn.
        let newest = i + 1 == audit.len();
        let first_seq = s.path.file_stem().and_then(|n| n.to_str()).and_then(|n| n.parse::<u64>().ok());
        let cut_short = !crate::audit::audit_tail_is_damage(audit_mark, first_seq.unwrap_or(0), s.valid, s.good_after);
        if newest && (s.len < crate::audit::SEGMENT_HEADER_LEN as u64 || (cut_short && s.valid > 0)) {
            torn.push(finding(s, "an audit record cut short at the end (never acknowledged)".into()));
        } else {
            damage.push(finding(s, "damaged audit record: the records from here on are unreadable".into()));
        }
    }
    drop(store);
    let ok = damage.is_empty();
    Ok(CheckReport {
        region: spec.name,
        ok,
        value_segments: values.len(),
        audit_segments: audit.len(),
        advice: (!ok).then(|| {
            "restore the region's data directory from a backup (`chatvault restore`), or start once with \
             `serve --accept-damage --replay-erasures` to cut the damaged files at the offsets above (the cut \
             bytes are kept beside them) and lose what they held"
                .into()
        }),
        damage,
        torn,
    })
}

#[derive(Debug, Serialize)]
pub struct RepairReport {
    pub region: String,
    /// What the damage cost: the places `check` listed before, each cut there.
    pub lost: Vec<Finding>,
    /// Where the cut-off bytes were kept.
    pub kept_aside: Vec<PathBuf>,
    /// `check` after the repair: no damage left.
    pub ok: bool,
}

/// `chatvault repair`: on a stopped region with damage, does what `serve
/// --accept-damage` would (cuts each damaged log where it goes bad, keeping the bytes
/// aside, drops records pointing into what was cut, rebuilds a lost index from its log),
/// then stops, and says what was lost. A region without damage is left untouched.
pub async fn repair(config: &Config) -> Result<RepairReport, ServerError> {
    let before = check(config)?;
    let spec = super::restore::one_sled_region(config, "repair")?;
    if before.ok {
        return Ok(RepairReport { region: before.region, lost: Vec::new(), kept_aside: Vec::new(), ok: true });
    }
    let mut accepting = config.clone();
    accepting.accept_damage = true;
    let node = super::node::Node::open(&accepting, &spec).await?;
    node.vault.sync()?;
    // Closed for good before `check` opens the store again.
    node.vault.detach_holds();
    drop(node);
    let after = check(config)?;
    let kept_aside = [spec.data_dir.join("values"), super::node::audit_dir(&spec.data_dir)]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains(".torn-"))
        .collect();
    Ok(RepairReport { region: after.region, lost: before.damage, kept_aside, ok: after.ok })
}

fn finding(s: &SegmentCheck, what: String) -> Finding {
    Finding { file: s.path.clone(), offset: s.valid, what }
}
