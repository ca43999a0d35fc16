//! Masking a job's secret values out of its output, the same way in the
//! agent SDK (before output is sent) and in the server (before it is
//! stored): each value in its plain, base64 and URL-encoded forms is
//! replaced by [`MASK`]. Values shorter than [`MIN_SECRET_LEN`] bytes are
//! not masked: masking single characters would destroy the output and
//! hide nothing.

use aho_corasick::{AhoCorasick, MatchKind};
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;

/// What a masked value is replaced by.
pub const MASK: &[u8] = b"***";
/// The shortest value that is masked.
pub const MIN_SECRET_LEN: usize = 3;

/// The forms of a set of secret values, and a matcher for all of them.
#[derive(Debug, Clone)]
pub struct Masker {
    forms: Vec<Vec<u8>>,
    matcher: Option<AhoCorasick>,
}

impl Masker {
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Masker {
        let mut forms: Vec<Vec<u8>> = Vec::new();
        for value in values {
            if value.len() < MIN_SECRET_LEN {
                continue;
            }
            let bytes = value.as_bytes();
            forms.push(bytes.to_vec());
            for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
                forms.push(engine.encode(bytes).into_bytes());
            }
            forms.push(url_encoded(bytes, false));
            forms.push(url_encoded(bytes, true));
        }
        forms.sort();
        forms.dedup();
        // Longest first: with leftmost-longest matching, the longer form of
        // two that start at one place wins.
        forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
        let matcher = if forms.is_empty() {
            None
        } else {
            AhoCorasick::builder().match_kind(MatchKind::LeftmostLongest).build(&forms).ok()
        };
        Masker { forms, matcher }
    }

    /// Whether there is anything to mask.
    pub fn is_empty(&self) -> bool {
        self.forms.is_empty()
    }

    /// `data` with every form of every value replaced by [`MASK`].
    pub fn mask(&self, data: &[u8]) -> Vec<u8> {
        match &self.matcher {
            Some(matcher) if matcher.is_match(data) => {
                let replacements = vec![MASK; self.forms.len()];
                matcher.replace_all_bytes(data, &replacements)
            }
            _ => data.to_vec(),
        }
    }

    /// How many bytes at the end of `data` could be the start of a form
    /// (so a value split across two chunks can still be masked once the
    /// next chunk comes).
    fn pending_prefix(&self, data: &[u8]) -> usize {
        let mut longest = 0;
        for form in &self.forms {
            let max = form.len().saturating_sub(1).min(data.len());
            for len in (longest + 1..=max).rev() {
                if data[data.len() - len..] == form[..len] {
                    longest = len;
                    break;
                }
            }
        }
        longest
    }
}

/// Percent-encoding of everything but RFC 3986's unreserved characters;
/// `plus_for_space` gives the form-encoding variant.
fn url_encoded(bytes: &[u8], plus_for_space: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() * 3);
    for &b in bytes {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b),
            b' ' if plus_for_space => out.push(b'+'),
            _ => out.extend_from_slice(format!("%{b:02X}").as_bytes()),
        }
    }
    out
}

/// Masks one output stream chunk by chunk, holding back the end of a chunk
/// while it could be the start of a secret, so a value split across two
/// chunks is masked too. [`StreamMasker::finish`] releases what is held.
#[derive(Debug, Clone)]
pub struct StreamMasker {
    masker: std::sync::Arc<Masker>,
    held: Vec<u8>,
}

impl StreamMasker {
    pub fn new(masker: std::sync::Arc<Masker>) -> StreamMasker {
        StreamMasker { masker, held: Vec::new() }
    }

    /// The masked output that can be sent now. What is held back is kept
    /// as it came (not masked), so it is matched again whole with what
    /// follows: a value that is the start of a longer one, or a match that
    /// reaches into the held end, is decided once the rest is known.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        if self.masker.is_empty() {
            return data.to_vec();
        }
        let mut all = std::mem::take(&mut self.held);
        all.extend_from_slice(data);
        let mut cut = all.len() - self.masker.pending_prefix(&all);
        if let Some(matcher) = &self.masker.matcher {
            if let Some(crossing) = matcher.find_iter(&all).find(|m| m.start() < cut && m.end() > cut) {
                cut = crossing.start();
            }
        }
        self.held = all.split_off(cut);
        self.masker.mask(&all)
    }

    /// What is still held, masked: the stream has ended.
    pub fn finish(&mut self) -> Vec<u8> {
        let held = std::mem::take(&mut self.held);
        self.masker.mask(&held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn masked(masker: &Masker, text: &str) -> String {
        String::from_utf8_lossy(&masker.mask(text.as_bytes())).into_owned()
    }

    #[test]
    fn plain_base64_and_url_encoded_forms_are_masked() {
        let m = Masker::new(["s3cr3t p@ss/word"]);
        assert_eq!(masked(&m, "token=s3cr3t p@ss/word;"), "token=***;");
        let b64 = STANDARD.encode("s3cr3t p@ss/word");
        assert_eq!(masked(&m, &format!("b64:{b64}")), "b64:***");
        let url_b64 = URL_SAFE_NO_PAD.encode("s3cr3t p@ss/word");
        assert_eq!(masked(&m, &format!("u:{url_b64}")), "u:***");
        assert_eq!(masked(&m, "q=s3cr3t%20p%40ss%2Fword&x"), "q=***&x");
        assert_eq!(masked(&m, "q=s3cr3t+p%40ss%2Fword&x"), "q=***&x");
        assert_eq!(masked(&m, "nothing here"), "nothing here");
    }

    #[test]
    fn short_values_are_never_masked_and_overlaps_mask_the_longest() {
        let m = Masker::new(["a", "xy", ""]);
        assert!(m.is_empty());
        assert_eq!(masked(&m, "a xy"), "a xy");
        let m = Masker::new(["abc", "abcdef"]);
        assert_eq!(masked(&m, "--abcdef--abc--"), "--***--***--");
        // ANSI colours around a value survive.
        let m = Masker::new(["hunter2"]);
        assert_eq!(masked(&m, "\x1b[31mhunter2\x1b[0m"), "\x1b[31m***\x1b[0m");
    }

    #[test]
    fn a_value_split_across_chunks_is_masked_and_other_output_is_not_held() {
        let m = Arc::new(Masker::new(["hunter2"]));
        let mut s = StreamMasker::new(m.clone());
        let mut out = s.push(b"pass: hun");
        assert_eq!(out, b"pass: ", "the possible start is held");
        out.extend(s.push(b"ter2 ok\n"));
        out.extend(s.finish());
        assert_eq!(String::from_utf8_lossy(&out), "pass: *** ok\n");
        let mut s = StreamMasker::new(m);
        assert_eq!(s.push(b"no secret\n"), b"no secret\n", "nothing held without a possible start");
        assert_eq!(s.push(b"ends with hu"), b"ends with ");
        assert_eq!(s.finish(), b"hu", "released at the end");
        // A value that is the start of a longer one waits for the rest.
        let mut s = StreamMasker::new(Arc::new(Masker::new(["abc", "abcdef"])));
        let mut out = s.push(b"x abc");
        out.extend(s.push(b"def y abc"));
        out.extend(s.push(b" z"));
        out.extend(s.finish());
        assert_eq!(String::from_utf8_lossy(&out), "x *** y *** z");
        // Byte by byte, a value is still masked.
        let mut s = StreamMasker::new(Arc::new(Masker::new(["hunter2"])));
        let mut out = Vec::new();
        for b in b"x hunter2 y" {
            out.extend(s.push(&[*b]));
        }
        out.extend(s.finish());
        assert_eq!(String::from_utf8_lossy(&out), "x *** y");
    }
}
