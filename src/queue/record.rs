//! The on-disk form of one queued event (`docs/protocol.md` §5): its file name and its
//! JSON record with a checksum, and the sidecar that says why an event is
//! dead. Encoding and decoding only; no I/O.
//!
//! The checksum is `sha256:` + hex of the compact JSON of the record
//! without its `checksum` field, with the event embedded byte for byte as
//! written. A reader re-serialises the small header from the parsed fields
//! and hashes it around the raw event bytes, so verifying costs one parse
//! and one hash, and any edit, truncation or torn write is caught.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::ids::{Hostname, RolloutId};
use crate::wire::OutboundEvent;

/// Bumped when the record layout changes; a reader refuses formats it does
/// not know rather than guessing.
pub const RECORD_FORMAT: u32 = 1;
/// Suffix of every event file.
pub const EVENT_SUFFIX: &str = ".json";
/// Suffix of a file being written; never read as an event, removed at open.
pub const TMP_SUFFIX: &str = ".tmp";
/// Suffix of the sidecar beside a dead event: `<event file name>.reason`.
pub const REASON_SUFFIX: &str = ".reason";
/// Suffix of the note beside an event revived from `dead/` into `acked/`:
/// `<event file name>.revived` (what it was dead for, when it came back).
pub const REVIVED_SUFFIX: &str = ".revived";
/// Digits of the zero-padded qseq that starts every event file name, so
/// lexical order is enqueue order (u64::MAX has 20 digits).
pub const QSEQ_DIGITS: usize = 20;
/// The rollout part of a file name is cut to this many characters: a
/// rollout id may be 193 characters, and name + `.reason` + `.tmp` must
/// stay under the 255-byte NAME_MAX of Linux file systems
/// (20 + 1 + 63 + 1 + 112 + 1 + 32 + 5 + 8 + 4 = 247 with the longest
/// suffix, `.revived`). The record, not the name, is the truth.
pub const MAX_NAME_ROLLOUT_CHARS: usize = 112;
/// The kind part of a file name (the longest kind today is 21 characters).
pub const MAX_NAME_KIND_CHARS: usize = 32;
/// A dead reason is cut to this many bytes: enough for any CP answer or
/// parse error, and it bounds a sidecar.
pub const MAX_DEAD_REASON_BYTES: usize = 4096;

/// One event as stored: the queue's own number, who and what it is about,
/// when it was queued, and the wire event itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedEvent {
    /// The queue's sequence number: global to the queue, strictly increasing
    /// in enqueue order, never reused.
    pub qseq: u64,
    pub hostname: Hostname,
    pub rollout_id: RolloutId,
    /// When the event was queued (the agent's clock).
    pub created_at: OffsetDateTime,
    /// The wire event; `event.seq` is the per-(host, rollout) seq.
    pub event: OutboundEvent,
}

impl QueuedEvent {
    pub fn seq(&self) -> u64 {
        self.event.seq
    }

    pub fn kind(&self) -> &'static str {
        self.event.kind()
    }

    /// The file name of this event in every queue folder.
    pub fn file_name(&self) -> String {
        file_name(self.qseq, self.hostname.as_str(), self.rollout_id.as_str(), self.kind())
    }
}

/// The header of a record: everything but the typed event. Cheap to decode
/// (`queue ls` reads only this) and already checksum-verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    pub qseq: u64,
    pub hostname: String,
    pub rollout_id: String,
    pub seq: u64,
    pub kind: String,
    pub created_at: OffsetDateTime,
}

/// The field order here is the byte order on disk and in the checksum.
#[derive(Serialize)]
struct RecordFields<'a> {
    format: u32,
    qseq: u64,
    hostname: &'a str,
    rollout_id: &'a str,
    seq: u64,
    kind: &'a str,
    created_at: &'a str,
    event: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    checksum: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordOnDisk<'a> {
    format: u32,
    qseq: u64,
    #[serde(borrow)]
    hostname: Cow<'a, str>,
    #[serde(borrow)]
    rollout_id: Cow<'a, str>,
    seq: u64,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    created_at: Cow<'a, str>,
    #[serde(borrow)]
    event: &'a RawValue,
    #[serde(borrow)]
    checksum: Cow<'a, str>,
}

/// Why bytes are not a valid record; the text goes into the dead sidecar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("not valid record JSON (truncated or torn?): {0}")]
    Json(String),
    #[error("record format {0} is not known to this nixfleet (knows {RECORD_FORMAT})")]
    Format(u32),
    #[error("checksum mismatch: file says {stored}, content hashes to {computed}")]
    Checksum { stored: String, computed: String },
    #[error("field {field}: {message}")]
    Field { field: &'static str, message: String },
}

fn field_error(field: &'static str, message: impl Into<String>) -> RecordError {
    RecordError::Field { field, message: message.into() }
}

/// Serialises an event into its record bytes (one line of compact JSON).
pub fn encode(ev: &QueuedEvent) -> Vec<u8> {
    let event_json =
        serde_json::to_string(&ev.event).expect("wire events always serialise (no maps with non-string keys)");
    let event = RawValue::from_string(event_json).expect("serde_json output is valid JSON");
    let created_at = ev.created_at.format(&Rfc3339).expect("queue timestamps are UTC instants within year 0..9999");
    let mut fields = RecordFields {
        format: RECORD_FORMAT,
        qseq: ev.qseq,
        hostname: ev.hostname.as_str(),
        rollout_id: ev.rollout_id.as_str(),
        seq: ev.event.seq,
        kind: ev.event.kind(),
        created_at: &created_at,
        event: &event,
        checksum: None,
    };
    let checksum = checksum_of(&fields);
    fields.checksum = Some(&checksum);
    let mut bytes = serde_json::to_vec(&fields).expect("record fields always serialise");
    bytes.push(b'\n');
    bytes
}

fn checksum_of(fields: &RecordFields<'_>) -> String {
    debug_assert!(fields.checksum.is_none());
    let body = serde_json::to_vec(fields).expect("record fields always serialise");
    sha256_tagged(&body)
}

/// `sha256:` + lowercase hex.
pub fn sha256_tagged(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Parses and verifies a record, returning the header and the raw event.
fn decode_raw(bytes: &[u8]) -> Result<(RecordHeader, &RawValue), RecordError> {
    let rec: RecordOnDisk<'_> = serde_json::from_slice(bytes).map_err(|e| RecordError::Json(e.to_string()))?;
    if rec.format != RECORD_FORMAT {
        return Err(RecordError::Format(rec.format));
    }
    let computed = checksum_of(&RecordFields {
        format: rec.format,
        qseq: rec.qseq,
        hostname: &rec.hostname,
        rollout_id: &rec.rollout_id,
        seq: rec.seq,
        kind: &rec.kind,
        created_at: &rec.created_at,
        event: rec.event,
        checksum: None,
    });
    if computed != rec.checksum {
        return Err(RecordError::Checksum { stored: rec.checksum.into_owned(), computed });
    }
    let created_at =
        OffsetDateTime::parse(&rec.created_at, &Rfc3339).map_err(|e| field_error("created_at", e.to_string()))?;
    let header = RecordHeader {
        qseq: rec.qseq,
        hostname: rec.hostname.into_owned(),
        rollout_id: rec.rollout_id.into_owned(),
        seq: rec.seq,
        kind: rec.kind.into_owned(),
        created_at,
    };
    Ok((header, rec.event))
}

/// Verifies the checksum and returns the header only (for listings).
pub fn decode_header(bytes: &[u8]) -> Result<RecordHeader, RecordError> {
    decode_raw(bytes).map(|(header, _)| header)
}

/// Verifies the checksum and decodes the whole record, checking that the
/// header agrees with the event it describes.
pub fn decode(bytes: &[u8]) -> Result<QueuedEvent, RecordError> {
    let (header, raw_event) = decode_raw(bytes)?;
    let event: OutboundEvent =
        serde_json::from_str(raw_event.get()).map_err(|e| field_error("event", e.to_string()))?;
    let hostname = Hostname::parse(&header.hostname).map_err(|e| field_error("hostname", e.to_string()))?;
    let rollout_id = RolloutId::parse(&header.rollout_id).map_err(|e| field_error("rollout_id", e.to_string()))?;
    if event.seq != header.seq {
        return Err(field_error("seq", format!("header says {}, event says {}", header.seq, event.seq)));
    }
    if event.kind() != header.kind {
        return Err(field_error("kind", format!("header says {}, event says {}", header.kind, event.kind())));
    }
    Ok(QueuedEvent { qseq: header.qseq, hostname, rollout_id, created_at: header.created_at, event })
}

/// `{qseq:020}-{hostname}-{rollout}-{event_kind}.json`, parts sanitised.
pub fn file_name(qseq: u64, hostname: &str, rollout_id: &str, kind: &str) -> String {
    let mut name = format!("{qseq:0width$}-", width = QSEQ_DIGITS);
    push_sanitised(&mut name, hostname, usize::MAX);
    name.push('-');
    push_sanitised(&mut name, rollout_id, MAX_NAME_ROLLOUT_CHARS);
    name.push('-');
    push_sanitised(&mut name, kind, MAX_NAME_KIND_CHARS);
    name.push_str(EVENT_SUFFIX);
    name
}

/// Anything outside `[A-Za-z0-9@._-]` becomes `_` (`docs/protocol.md` §5).
fn push_sanitised(out: &mut String, part: &str, max_chars: usize) {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '@' | '.' | '_' | '-');
    out.extend(part.chars().take(max_chars).map(|c| if ok(c) { c } else { '_' }));
}

/// The qseq a file name starts with, if it has the event-name shape.
pub fn qseq_of_name(name: &str) -> Option<u64> {
    let digits = name.get(..QSEQ_DIGITS)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) || name.as_bytes().get(QSEQ_DIGITS) != Some(&b'-') {
        return None;
    }
    digits.parse().ok()
}

/// True for names the queue writes as events (`<20 digits>-….json`).
pub fn is_event_name(name: &str) -> bool {
    name.ends_with(EVENT_SUFFIX) && qseq_of_name(name).is_some()
}

/// Why an event is in `dead/`; stored as `<event file name>.reason`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadReason {
    /// Who sent it there: `rejected` (the CP refused it) or `corrupt`
    /// (start-up recovery could not read it).
    pub cause: DeadCause,
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    pub dead_at: OffsetDateTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeadCause {
    Rejected,
    Corrupt,
}

impl DeadCause {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadCause::Rejected => "rejected",
            DeadCause::Corrupt => "corrupt",
        }
    }
}

impl DeadReason {
    pub fn new(cause: DeadCause, reason: &str, dead_at: OffsetDateTime) -> DeadReason {
        DeadReason { cause, reason: truncate_utf8(reason, MAX_DEAD_REASON_BYTES).to_owned(), dead_at }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec(self).expect("dead reasons always serialise");
        bytes.push(b'\n');
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<DeadReason, RecordError> {
        serde_json::from_slice(bytes).map_err(|e| RecordError::Json(e.to_string()))
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char
/// boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Why an acked event has a history: it was dead, and a re-send after a gap
/// or a Replay-From got it applied. Stored as `acked/<name>.revived`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevivedNote {
    /// The reason it had in `dead/`.
    pub was_dead: DeadReason,
    #[serde(with = "time::serde::rfc3339")]
    pub revived_at: OffsetDateTime,
}

impl RevivedNote {
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec(self).expect("revived notes always serialise");
        bytes.push(b'\n');
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<RevivedNote, RecordError> {
        serde_json::from_slice(bytes).map_err(|e| RecordError::Json(e.to_string()))
    }
}
