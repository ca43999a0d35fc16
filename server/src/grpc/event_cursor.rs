//! Watch cursors on the wire: the one place an [`EventCursor`] becomes an
//! opaque string and back. The string is URL-safe base64 (no padding) of
//! `"ev"`, a format byte (1), the shard count (one byte) and each shard's
//! position as a LEB128 varint. Anything else, including trailing bytes,
//! a non-minimal varint or a shard count this format never writes, is
//! refused with INVALID_ARGUMENT naming the field.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::domain::{DomainError, DomainResult};
use crate::store::EventCursor;

/// The longest cursor string accepted (64 shards of 10-byte varints stay
/// well under it; today's layouts have 1 or 8 shards).
pub const MAX_CURSOR: usize = 512;

const TAG: &[u8] = b"ev";
const FORMAT: u8 = 1;
const MAX_SHARDS: usize = 64;

pub fn encode(cursor: &EventCursor) -> String {
    let mut bytes = Vec::with_capacity(4 + cursor.positions.len() * 4);
    bytes.extend_from_slice(TAG);
    bytes.push(FORMAT);
    bytes.push(u8::try_from(cursor.positions.len()).unwrap_or(u8::MAX));
    for &p in &cursor.positions {
        let mut v = p;
        loop {
            let low = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                bytes.push(low);
                break;
            }
            bytes.push(low | 0x80);
        }
    }
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The cursor in `text`, `None` when empty (from now).
pub fn decode(field: &str, text: &str) -> DomainResult<Option<EventCursor>> {
    if text.is_empty() {
        return Ok(None);
    }
    let foreign = || DomainError::invalid(field, "is not a watch cursor this server issued");
    if text.len() > MAX_CURSOR {
        return Err(foreign());
    }
    let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| foreign())?;
    let rest = bytes.strip_prefix(TAG).ok_or_else(foreign)?;
    let (&format, rest) = rest.split_first().ok_or_else(foreign)?;
    if format != FORMAT {
        return Err(DomainError::invalid(
            field,
            format!("is a watch cursor of format {format}, which this server does not read"),
        ));
    }
    let (&shards, mut rest) = rest.split_first().ok_or_else(foreign)?;
    let shards = usize::from(shards);
    if shards == 0 || shards > MAX_SHARDS {
        return Err(foreign());
    }
    let mut positions = Vec::with_capacity(shards);
    for _ in 0..shards {
        let (value, tail) = varint(rest).ok_or_else(foreign)?;
        positions.push(value);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(foreign());
    }
    Ok(Some(EventCursor { positions }))
}

/// A minimal LEB128 u64 and what follows it.
fn varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value: u64 = 0;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        let low = u64::from(b & 0x7f);
        if i == 9 && low > 1 {
            return None; // beyond 64 bits
        }
        value |= low << (7 * i);
        if b & 0x80 == 0 {
            // A trailing zero byte is a second spelling of a shorter value.
            if i > 0 && b == 0 {
                return None;
            }
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> bool {
        matches!(decode("cursor", text), Err(DomainError::InvalidArgument { field, .. }) if field == "cursor")
    }

    #[test]
    fn cursors_round_trip() {
        for positions in [vec![0], vec![u64::MAX], vec![1, 2, 3, 4, 5, 6, 7, 1 << 40], vec![127, 128, 16_383, 16_384]] {
            let cursor = EventCursor { positions };
            let text = encode(&cursor);
            assert!(text.len() <= MAX_CURSOR);
            assert_eq!(decode("cursor", &text).expect("decodes"), Some(cursor));
        }
        assert_eq!(decode("cursor", "").expect("empty"), None);
    }

    #[test]
    fn anything_else_is_refused_with_the_field_named() {
        let good = encode(&EventCursor { positions: vec![5, 300] });
        let raw = URL_SAFE_NO_PAD.decode(&good).expect("base64");
        let spell = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        let mut extra = raw.clone();
        extra.push(0);
        let mut other_format = raw.clone();
        other_format[2] = 2;
        let cases = [
            "garbage!".to_string(),
            "@@@".into(),
            spell(b"ev"),
            spell(b"xx\x01\x01\x00"),
            spell(&raw[..raw.len() - 1]), // truncated varint
            spell(&raw[..4]),             // truncated: no positions
            spell(&extra),                // trailing bytes
            spell(b"ev\x01\x00"),         // no shards
            spell(b"ev\x01\x41"),         // more shards than any layout
            spell(b"ev\x01\x01\x80\x00"), // non-minimal varint
            spell(&[b'e', b'v', 1, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]), // > u64
            "A".repeat(MAX_CURSOR + 1),
            crate::grpc::page_token::encode(crate::grpc::page_token::Listing::Jobs, Some("5")),
        ];
        for case in cases {
            assert!(refused(&case), "{case:?} was accepted");
        }
        assert!(
            matches!(decode("cursor", &spell(&other_format)), Err(DomainError::InvalidArgument { reason, .. }) if reason.contains("format 2"))
        );
    }
}
