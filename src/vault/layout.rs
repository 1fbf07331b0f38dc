//! How vault records are laid out in the one ordered key space: a type byte, then
//! length-prefixed or fixed-width big-endian fields, so prefix scans select exactly
//! one tenant, subject or transcript.

/// Type bytes. The order matters only for readability of dumps.
mod kind {
    pub const META: u8 = 0x00;
    pub const KEY: u8 = 0x01;
    pub const SUBJECT: u8 = 0x02;
    pub const HEADER: u8 = 0x03;
    pub const BY_SUBJECT: u8 = 0x04;
    pub const MESSAGE: u8 = 0x05;
    pub const GARBAGE: u8 = 0x06;
    pub const BODY: u8 = 0x07;
    pub const VALUES: u8 = 0x08;
    pub const TIMES: u8 = 0x09;
    pub const REQUESTS: u8 = 0x0a;
    pub const PACK: u8 = 0x0b;
}

const VALUES_TALLY: u8 = 1;
const VALUES_RETIRED: u8 = 2;

const KEY_TENANT: u8 = 1;
const KEY_SUBJECT: u8 = 2;
const KEY_TRANSCRIPT: u8 = 3;

pub type Blind = [u8; 32];

fn with_tenant(kind: u8, tenant: &str, extra: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + tenant.len() + extra);
    k.push(kind);
    k.push(tenant.len() as u8);
    k.extend_from_slice(tenant.as_bytes());
    k
}

pub fn meta(name: &str) -> Vec<u8> {
    let mut k = vec![kind::META];
    k.extend_from_slice(name.as_bytes());
    k
}

/// Every wrapped key (tenant, subject and transcript keys): the set a rotation re-wraps.
pub fn keys_prefix() -> Vec<u8> {
    vec![kind::KEY]
}

pub fn tenant_key(tenant: &str) -> Vec<u8> {
    let mut k = vec![kind::KEY, KEY_TENANT];
    k.push(tenant.len() as u8);
    k.extend_from_slice(tenant.as_bytes());
    k
}

pub fn subject_key(tenant: &str, subject: &Blind) -> Vec<u8> {
    let mut k = subject_keys_prefix(tenant);
    k.extend_from_slice(subject);
    k
}

/// A transcript incarnation's key, sealed under a key-store key (see `RecordKind::TranscriptKeySeal`).
pub fn transcript_key(tenant: &str, transcript: &Blind, incarnation: u64) -> Vec<u8> {
    let mut k = transcript_keys_prefix(tenant);
    k.extend_from_slice(transcript);
    k.extend_from_slice(&incarnation.to_be_bytes());
    k
}

/// Every transcript key of one tenant.
pub fn transcript_keys_prefix(tenant: &str) -> Vec<u8> {
    let mut k = vec![kind::KEY, KEY_TRANSCRIPT];
    k.push(tenant.len() as u8);
    k.extend_from_slice(tenant.as_bytes());
    k
}

/// Which key a record under [`keys_prefix`] holds.
pub enum KeyOwner {
    Tenant(String),
    Subject(String, Blind),
    Transcript(String, Blind, u64),
}

pub fn parse_key_owner(key: &[u8]) -> Option<KeyOwner> {
    let (&sub, rest) = key.get(1..)?.split_first()?;
    let (&len, rest) = rest.split_first()?;
    let tenant = std::str::from_utf8(rest.get(..len as usize)?).ok()?.to_owned();
    let rest = &rest[len as usize..];
    match sub {
        KEY_TENANT if rest.is_empty() => Some(KeyOwner::Tenant(tenant)),
        KEY_SUBJECT => Some(KeyOwner::Subject(tenant, rest.try_into().ok()?)),
        KEY_TRANSCRIPT if rest.len() == 40 => Some(KeyOwner::Transcript(
            tenant,
            rest[..32].try_into().ok()?,
            u64::from_be_bytes(rest[32..].try_into().ok()?),
        )),
        _ => None,
    }
}

/// The tenant of a record under [`keys_prefix`].
pub fn key_tenant(key: &[u8]) -> Option<&str> {
    let len = *key.get(2)? as usize;
    std::str::from_utf8(key.get(3..3 + len)?).ok()
}

/// Every subject key of one tenant.
pub fn subject_keys_prefix(tenant: &str) -> Vec<u8> {
    let mut k = vec![kind::KEY, KEY_SUBJECT];
    k.push(tenant.len() as u8);
    k.extend_from_slice(tenant.as_bytes());
    k
}

/// Every prefix holding records of one tenant, keys last: what erasing it removes.
pub fn tenant_prefixes(tenant: &str) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = [kind::SUBJECT, kind::HEADER, kind::BY_SUBJECT, kind::MESSAGE, kind::BODY]
        .iter()
        .map(|&k| with_tenant(k, tenant, 0))
        .collect();
    v.extend(TimeIndex::ALL.iter().map(|&which| times_prefix(which, tenant)));
    v.push(with_tenant(kind::REQUESTS, tenant, 0));
    v.push(with_tenant(kind::PACK, tenant, 0));
    v.push(transcript_keys_prefix(tenant));
    v.push(subject_keys_prefix(tenant));
    v.push(tenant_key(tenant));
    v
}

pub fn subject(tenant: &str, subject: &Blind) -> Vec<u8> {
    let mut k = with_tenant(kind::SUBJECT, tenant, 32);
    k.extend_from_slice(subject);
    k
}

/// Every subject record of every tenant.
pub fn subjects_prefix() -> Vec<u8> {
    vec![kind::SUBJECT]
}

/// The tenant and subject a [`subject`] key names.
pub fn parse_subject(key: &[u8]) -> Option<(String, Blind)> {
    let (&k, rest) = key.split_first()?;
    let (&len, rest) = rest.split_first()?;
    let tenant = std::str::from_utf8(rest.get(..len as usize)?).ok()?.to_owned();
    let rest = rest.get(len as usize..)?;
    (k == kind::SUBJECT).then_some(())?;
    Some((tenant, rest.try_into().ok()?))
}

/// Every transcript header of every tenant.
pub fn all_headers_prefix() -> Vec<u8> {
    vec![kind::HEADER]
}

/// The tenant and transcript a [`header`] key names.
pub fn parse_header(key: &[u8]) -> Option<(String, Blind)> {
    let (&k, rest) = key.split_first()?;
    let (&len, rest) = rest.split_first()?;
    (k == kind::HEADER).then_some(())?;
    let tenant = std::str::from_utf8(rest.get(..len as usize)?).ok()?.to_owned();
    Some((tenant, rest.get(len as usize..)?.try_into().ok()?))
}

/// Every transcript header of one tenant, in blind-id order.
pub fn headers_prefix(tenant: &str) -> Vec<u8> {
    with_tenant(kind::HEADER, tenant, 32)
}

pub fn header(tenant: &str, transcript: &Blind) -> Vec<u8> {
    let mut k = headers_prefix(tenant);
    k.extend_from_slice(transcript);
    k
}

/// Index of one subject generation's transcripts, newest `started_at` first.
pub fn by_subject_prefix(tenant: &str, subject: &Blind, generation: u32) -> Vec<u8> {
    let mut k = with_tenant(kind::BY_SUBJECT, tenant, 76);
    k.extend_from_slice(subject);
    k.extend_from_slice(&generation.to_be_bytes());
    k
}

pub fn by_subject(tenant: &str, subject: &Blind, generation: u32, started_micros: i64, transcript: &Blind) -> Vec<u8> {
    let mut k = by_subject_prefix(tenant, subject, generation);
    k.extend_from_slice(&(u64::MAX - started_micros as u64).to_be_bytes());
    k.extend_from_slice(transcript);
    k
}

/// The transcript blind id at the end of a [`by_subject`] or [`header`] key.
pub fn trailing_blind(key: &[u8]) -> Option<Blind> {
    key.get(key.len().checked_sub(32)?..)?.try_into().ok()
}

pub fn messages_prefix(tenant: &str, transcript: &Blind, incarnation: u64) -> Vec<u8> {
    let mut k = with_tenant(kind::MESSAGE, tenant, 44);
    k.extend_from_slice(transcript);
    k.extend_from_slice(&incarnation.to_be_bytes());
    k
}

pub fn message(tenant: &str, transcript: &Blind, incarnation: u64, seq: u32) -> Vec<u8> {
    let mut k = messages_prefix(tenant, transcript, incarnation);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// A chunk sealing messages `first .. first + count` as one record. It shares the message
/// key space (its key is 4 bytes longer than a single message's and sorts right after
/// `first`'s), so what handles message records by prefix handles chunks too.
pub fn message_chunk(tenant: &str, transcript: &Blind, incarnation: u64, first: u32, count: u32) -> Vec<u8> {
    let mut k = message(tenant, transcript, incarnation, first);
    k.extend_from_slice(&count.to_be_bytes());
    k
}

/// The exclusive scan bound just before every record that starts at `seq` or later.
pub fn messages_from(tenant: &str, transcript: &Blind, incarnation: u64, seq: u32) -> Option<Vec<u8>> {
    let before = seq.checked_sub(1)?;
    let mut k = message(tenant, transcript, incarnation, before);
    k.extend_from_slice(&[0xff; 4]);
    Some(k)
}

/// The sequence numbers a message record covers, `(first, count)`: one for a single
/// message, its span for a chunk. `prefix_len` is its [`messages_prefix`]'s length.
pub fn message_span(key: &[u8], prefix_len: usize) -> Option<(u32, u32)> {
    let tail = key.get(prefix_len..)?;
    let first = u32::from_be_bytes(tail.get(..4)?.try_into().ok()?);
    match tail.len() {
        4 => (first < u32::MAX).then_some((first, 1)),
        8 => {
            let count = u32::from_be_bytes(tail[4..].try_into().ok()?);
            (count > 0 && first.checked_add(count).is_some()).then_some((first, count))
        }
        _ => None,
    }
}

/// Whether a message record under a prefix of `prefix_len` bytes is a chunk.
pub fn is_chunk(key: &[u8], prefix_len: usize) -> bool {
    key.len() == prefix_len + 8
}

/// Every message record of every tenant.
pub fn all_messages_prefix() -> Vec<u8> {
    vec![kind::MESSAGE]
}

/// Whether `key` is a [`message`] or [`message_chunk`] record's.
pub fn is_message(key: &[u8]) -> bool {
    key.first() == Some(&kind::MESSAGE)
}

/// A queued packing of one group of a transcript's messages into a chunk.
pub fn pack_queued(tenant: &str, transcript: &Blind, incarnation: u64, group: u32) -> Vec<u8> {
    let mut k = with_tenant(kind::PACK, tenant, 44);
    k.extend_from_slice(transcript);
    k.extend_from_slice(&incarnation.to_be_bytes());
    k.extend_from_slice(&group.to_be_bytes());
    k
}

/// Every queued packing.
pub fn pack_queue_prefix() -> Vec<u8> {
    vec![kind::PACK]
}

/// The tenant, transcript, incarnation and group a [`pack_queued`] key names.
pub fn parse_pack_queued(key: &[u8]) -> Option<(String, Blind, u64, u32)> {
    let (&k, rest) = key.split_first()?;
    let (&len, rest) = rest.split_first()?;
    (k == kind::PACK).then_some(())?;
    let tenant = std::str::from_utf8(rest.get(..len as usize)?).ok()?.to_owned();
    let rest = rest.get(len as usize..)?;
    (rest.len() == 44).then_some(())?;
    Some((
        tenant,
        rest[..32].try_into().ok()?,
        u64::from_be_bytes(rest[32..40].try_into().ok()?),
        u32::from_be_bytes(rest[40..].try_into().ok()?),
    ))
}

/// A transcript incarnation's wrapped key and encrypted body: written once, never on append.
pub fn body(tenant: &str, transcript: &Blind, incarnation: u64) -> Vec<u8> {
    let mut k = with_tenant(kind::BODY, tenant, 40);
    k.extend_from_slice(transcript);
    k.extend_from_slice(&incarnation.to_be_bytes());
    k
}

/// Dead bytes counted in one value-log segment.
pub fn value_tally(segment: u32) -> Vec<u8> {
    let mut k = vec![kind::VALUES, VALUES_TALLY];
    k.extend_from_slice(&segment.to_be_bytes());
    k
}

/// Every value-log segment's tally.
pub fn value_tally_prefix() -> Vec<u8> {
    vec![kind::VALUES, VALUES_TALLY]
}

/// Value-log segments compacted and waiting for their files to be deleted.
pub fn value_retired_prefix() -> Vec<u8> {
    vec![kind::VALUES, VALUES_RETIRED]
}

pub fn value_retired(segment: u32) -> Vec<u8> {
    let mut k = value_retired_prefix();
    k.extend_from_slice(&segment.to_be_bytes());
    k
}

/// The segment at the end of a [`value_tally`] or [`value_retired`] key.
pub fn value_segment_of(key: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(key.get(2..)?.try_into().ok()?))
}

/// The time indexes retention reads: a run finds what is due by scanning the oldest
/// entries of one tenant, so it costs what it purges, never a scan of the tenant.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TimeIndex {
    /// Every live transcript, by `started_at`.
    Started = 1,
    /// Closed transcripts, by `ended_at`.
    Closed = 2,
    /// Open transcripts, by the minute of their last write.
    Active = 3,
}

impl TimeIndex {
    pub const ALL: [TimeIndex; 3] = [TimeIndex::Started, TimeIndex::Closed, TimeIndex::Active];
}

pub fn times_prefix(which: TimeIndex, tenant: &str) -> Vec<u8> {
    let mut k = vec![kind::TIMES, which as u8];
    k.push(tenant.len() as u8);
    k.extend_from_slice(tenant.as_bytes());
    k
}

/// Microseconds as big-endian bytes that sort like the signed number.
fn ordered(micros: i64) -> [u8; 8] {
    ((micros as u64) ^ (1 << 63)).to_be_bytes()
}

/// An entry of a time index; its value is the transcript's incarnation.
pub fn time_entry(which: TimeIndex, tenant: &str, at_micros: i64, transcript: &Blind) -> Vec<u8> {
    let mut k = times_prefix(which, tenant);
    k.extend_from_slice(&ordered(at_micros));
    k.extend_from_slice(transcript);
    k
}

/// The first key of `which` past every entry at or before `at_micros`.
pub fn time_bound(which: TimeIndex, tenant: &str, at_micros: i64) -> Vec<u8> {
    time_entry(which, tenant, at_micros, &[0xff; 32])
}

/// The time and transcript of a [`time_entry`] key.
pub fn parse_time_entry(key: &[u8]) -> Option<(i64, Blind)> {
    let tail = key.get(key.len().checked_sub(40)?..)?;
    let at = u64::from_be_bytes(tail[..8].try_into().ok()?) ^ (1 << 63);
    Some((at as i64, tail[8..].try_into().ok()?))
}

/// Every kept answer to a batch request.
pub fn requests_prefix() -> Vec<u8> {
    vec![kind::REQUESTS]
}

/// The kept answer to one tenant's batch request (`request` is a hash of its id).
pub fn request(tenant: &str, request: &Blind) -> Vec<u8> {
    let mut k = with_tenant(kind::REQUESTS, tenant, 32);
    k.extend_from_slice(request);
    k
}

pub fn garbage_prefix() -> Vec<u8> {
    vec![kind::GARBAGE]
}

pub fn garbage(id: [u8; 16]) -> Vec<u8> {
    let mut k = vec![kind::GARBAGE];
    k.extend_from_slice(&id);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_transcripts_sort_first_in_the_subject_index() {
        let old = by_subject("t", &[1; 32], 0, 1_000, &[9; 32]);
        let new = by_subject("t", &[1; 32], 0, 2_000, &[0; 32]);
        assert!(new < old);
    }

    #[test]
    fn tenant_prefixes_do_not_overlap() {
        // "ab" must not be a prefix-scan match for tenant "a" + a blind starting with 'b'.
        assert!(!header("ab", &[0; 32]).starts_with(&header("a", &[b'b'; 32])[..3]));
        assert_ne!(header("ab", &[0; 32])[1], header("a", &[0; 32])[1]);
    }

    #[test]
    fn key_owner_round_trips() {
        match parse_key_owner(&subject_key("acme", &[7; 32])) {
            Some(KeyOwner::Subject(t, s)) => assert_eq!((t.as_str(), s), ("acme", [7; 32])),
            _ => panic!("not a subject key"),
        }
        assert!(matches!(parse_key_owner(&tenant_key("acme")), Some(KeyOwner::Tenant(t)) if t == "acme"));
        assert_eq!(key_tenant(&subject_key("acme", &[7; 32])), Some("acme"));
        assert_eq!(key_tenant(&tenant_key("acme")), Some("acme"));
        match parse_key_owner(&transcript_key("acme", &[3; 32], 9)) {
            Some(KeyOwner::Transcript(t, tb, inc)) => assert_eq!((t.as_str(), tb, inc), ("acme", [3; 32], 9)),
            _ => panic!("not a transcript key"),
        }
    }

    #[test]
    fn subject_keys_parse_back() {
        assert_eq!(parse_subject(&subject("acme", &[5; 32])), Some(("acme".into(), [5; 32])));
        assert_eq!(parse_subject(&header("acme", &[5; 32])), None);
    }

    #[test]
    fn time_entries_sort_by_time_before_and_after_1970_and_parse_back() {
        let at = |t: i64| time_entry(TimeIndex::Closed, "acme", t, &[3; 32]);
        assert!(at(-5) < at(0) && at(0) < at(7) && at(7) < at(i64::MAX));
        assert!(at(7) < time_bound(TimeIndex::Closed, "acme", 7));
        assert!(time_bound(TimeIndex::Closed, "acme", 7) < time_entry(TimeIndex::Closed, "acme", 8, &[0; 32]));
        assert_eq!(parse_time_entry(&at(-5)), Some((-5, [3; 32])));
        assert!(at(1).starts_with(&times_prefix(TimeIndex::Closed, "acme")));
        assert!(!at(1).starts_with(&times_prefix(TimeIndex::Started, "acme")));
        assert_eq!(parse_header(&header("acme", &[4; 32])), Some(("acme".into(), [4; 32])));
    }

    #[test]
    fn message_spans_are_read_back_and_chunks_sort_between_their_first_message_and_the_next() {
        let len = messages_prefix("t", &[1; 32], 5).len();
        assert_eq!(message_span(&message("t", &[1; 32], 5, 77), len), Some((77, 1)));
        let chunk = message_chunk("t", &[1; 32], 5, 64, 10);
        assert_eq!(message_span(&chunk, len), Some((64, 10)));
        assert!(is_chunk(&chunk, len) && !is_chunk(&message("t", &[1; 32], 5, 64), len));
        assert!(message("t", &[1; 32], 5, 63) < chunk && chunk < message("t", &[1; 32], 5, 65));
        let from = messages_from("t", &[1; 32], 5, 64).unwrap();
        assert!(message_chunk("t", &[1; 32], 5, 63, u32::MAX - 63) <= from && from < message("t", &[1; 32], 5, 64));
        assert_eq!(messages_from("t", &[1; 32], 5, 0), None);
        assert_eq!(message_span(&message_chunk("t", &[1; 32], 5, 3, 0), len), None);
        let q = pack_queued("acme", &[2; 32], 9, 4);
        assert_eq!(parse_pack_queued(&q), Some(("acme".into(), [2; 32], 9, 4)));
        assert!(tenant_prefixes("acme").iter().any(|p| q.starts_with(p)));
    }
}
