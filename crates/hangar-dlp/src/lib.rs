//! Data-loss prevention: detectors that find secrets and personal data in what leaves Hangar —
//! an agent's answer, which the caller redacts or blocks, and the body of a sandbox's egress
//! request, which it blocks. A [`Scanner`] is built once from [`DetectorSpec`]s and shared; it
//! finds [`Hit`]s, replaces them with `[REDACTED:<detector>]`, and through [`StreamRedactor`]
//! does the same for text that arrives in pieces.
//!
//! The crate is pure and must never keep or pass on what it finds: a [`Hit`] holds a detector
//! name and byte offsets, not the matched text, so hits can be logged and audited freely.
//!
//! # Built-in detectors
//!
//! All four are ASCII patterns tuned to flag few things that are not secrets.
//!
//! - `card_number`: a payment card number of 13–19 digits, written together or grouped 4-4-4-4
//!   (with an optional last group of 1–3 digits), 4-6-5 or 4-6-4, with one space or one dash
//!   between groups, the same throughout. Its first digit is 2–6 (the card networks' range, which
//!   leaves out millisecond timestamps) and its digits pass the Luhn check. Neither end may touch
//!   a letter, a digit or `_`, so digits inside a longer digit run, a hex string or an identifier
//!   are not a card. Grouped digits may sit next to other groups, as in `exp 12 4111 1111 1111
//!   1111`. Not matched: other separators (dots, double spaces, a mix), other groupings, and
//!   non-ASCII digits.
//! - `private_key`: a PEM private key block, from a `-----BEGIN PRIVATE KEY-----` line (or the
//!   RSA, EC, DSA, OPENSSH, ENCRYPTED or PGP variant, with or without `BLOCK`) through the first
//!   END line with the same label, whatever lies between: newlines, `\n` escapes in JSON,
//!   indentation. Without that END line within [`PRIVATE_KEY_MAX_LEN`] bytes, the block runs to
//!   that limit or to the end of the text, whichever comes first, because a truncated key is
//!   still a leak. Not matched: public keys, certificates, and key material without its BEGIN
//!   line.
//! - `cloud_key`: AWS access key ids (`AKIA` or `ASIA` and 16 upper-case letters or digits, as a
//!   whole word); AWS secret access keys (40 base64 characters) only after a label such as
//!   `aws_secret_access_key =`, `AWS_SECRET_ACCESS_KEY=` or `"SecretAccessKey": "`; Google API
//!   keys (`AIza` and 35 more); GitHub tokens (`ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_` and 36 or
//!   more letters or digits, and `github_pat_…`); Slack tokens (`xoxb-`, `xoxa-`, `xoxp-`,
//!   `xoxr-`, `xoxs-`); OpenAI and Anthropic keys (`sk-` and 20 or more of `A-Za-z0-9_-`, which
//!   covers `sk-proj-…` and `sk-ant-…`); Azure storage account keys (`AccountKey=` and 88 base64
//!   characters). For the AWS secret and the Azure key only the value is the hit, so the label
//!   stays readable. Not matched: an unlabelled AWS secret (it cannot be told from any base64
//!   string), keys run into surrounding letters, and other providers' formats.
//! - `email`: an address `local@domain.tld`: the local part is dot-separated runs of ASCII
//!   letters, digits and `_%+-`; the domain is dot-separated labels of letters, digits and inner
//!   hyphens, ending in a label of 2–63 letters; both ends are word boundaries. Not matched:
//!   quoted local parts, IP-literal domains (`user@[10.0.0.1]`), internationalised addresses and
//!   hosts without a dot (`root@localhost`). Names like `logo@2x.png` do match.
//!
//! # Custom detectors
//!
//! A [`DetectorKind::Regex`] is a pattern in the `regex` crate's syntax: case-sensitive and in
//! Unicode mode unless it says otherwise (`(?i)`, `(?-u)`). Its compiled form may take at most
//! 1 MiB, and it must not match the empty string.
//!
//! # Hits
//!
//! Hits are byte offsets, sorted and non-overlapping. Where matches of several detectors overlap,
//! one hit covers all of them and is named after the one that starts first (the longest, when
//! several start together), so that no part of any match is left in clear. In text, hits always
//! fall on character boundaries: a match ending inside a character (a `(?-u)` pattern, or a key
//! cut at its length limit) is widened to whole characters.
//!
//! Detectors see the text as it is: nothing is decoded first, so a secret that is
//! percent-encoded, base64-encoded, compressed or escaped (`\u0040` for `@`) is not found.

mod builtin;
mod stream;

pub use builtin::PRIVATE_KEY_MAX_LEN;
pub use stream::{StreamRedactor, HOLD_BACK, MAX_HELD};

use std::cmp::Reverse;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;

use regex::bytes::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

/// The most memory one custom pattern may compile to, so that a configured pattern such as
/// `\w{1000}{1000}` is refused instead of exhausting the host.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Texts on which a custom pattern must not find an empty match: with the text's edges, a line
/// break and word edges they give the common assertions (`^`, `$`, `\b`, `\B`) each outcome.
const EMPTY_PROBES: [&str; 8] = ["", "a", "é", " ", "\n", "\r\n", "a b", "0"];

/// A detector built into the crate; see the crate documentation for what each matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Builtin {
    CardNumber,
    PrivateKey,
    CloudKey,
    Email,
}

impl Builtin {
    pub const ALL: [Builtin; 4] = [
        Builtin::CardNumber,
        Builtin::PrivateKey,
        Builtin::CloudKey,
        Builtin::Email,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Builtin::CardNumber => "card_number",
            Builtin::PrivateKey => "private_key",
            Builtin::CloudKey => "cloud_key",
            Builtin::Email => "email",
        }
    }
}

impl fmt::Display for Builtin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Builtin {
    type Err = UnknownBuiltin;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Builtin::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or_else(|| UnknownBuiltin(s.to_owned()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown built-in detector {0:?}; expected card_number, private_key, cloud_key or email")]
pub struct UnknownBuiltin(pub String);

/// One detector to build into a [`Scanner`]. Its name is what hits and redactions report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectorSpec {
    pub name: String,
    pub kind: DetectorKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetectorKind {
    Builtin(Builtin),
    /// A pattern in the `regex` crate's syntax.
    Regex(String),
}

impl DetectorSpec {
    /// A built-in detector under its own name.
    pub fn builtin(builtin: Builtin) -> Self {
        DetectorSpec {
            name: builtin.as_str().to_owned(),
            kind: DetectorKind::Builtin(builtin),
        }
    }

    pub fn regex(name: impl Into<String>, pattern: impl Into<String>) -> Self {
        DetectorSpec {
            name: name.into(),
            kind: DetectorKind::Regex(pattern.into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("detector name {0:?} must be 1 to 64 ASCII letters, digits, '_', '-' or '.'")]
    Name(String),
    #[error("detector {0:?} is defined twice; give each detector its own name")]
    DuplicateName(String),
    #[error("detector {name:?}: invalid regex")]
    Regex {
        name: String,
        #[source]
        source: regex::Error,
    },
    #[error("detector {0:?}: the regex can match the empty string; make it match at least one character")]
    EmptyMatch(String),
}

/// Where a detector matched: `start..end` in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hit {
    pub detector: String,
    pub start: usize,
    pub end: usize,
}

/// A compiled set of detectors. Cloning is cheap and clones share the compiled patterns.
#[derive(Debug, Clone)]
pub struct Scanner {
    detectors: Arc<[Detector]>,
}

#[derive(Debug)]
struct Detector {
    name: String,
    matcher: Matcher,
}

#[derive(Debug)]
enum Matcher {
    Builtin(Builtin),
    Regex(Regex),
}

impl Scanner {
    pub fn new(specs: &[DetectorSpec]) -> Result<Scanner, BuildError> {
        let mut detectors: Vec<Detector> = Vec::with_capacity(specs.len());
        for spec in specs {
            let name = &spec.name;
            let valid_name = (1..=64).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
            if !valid_name {
                return Err(BuildError::Name(name.clone()));
            }
            if detectors.iter().any(|d| d.name == *name) {
                return Err(BuildError::DuplicateName(name.clone()));
            }
            let matcher = match &spec.kind {
                DetectorKind::Builtin(builtin) => Matcher::Builtin(*builtin),
                DetectorKind::Regex(pattern) => Matcher::Regex(compile(name, pattern)?),
            };
            detectors.push(Detector {
                name: name.clone(),
                matcher,
            });
        }
        Ok(Scanner {
            detectors: detectors.into(),
        })
    }

    /// Built-ins by name and custom patterns by name, as `agent.yaml`'s `guardrails` lists
    /// them; the error names the bad one.
    pub fn from_config(
        builtins: &[String],
        patterns: &std::collections::BTreeMap<String, String>,
    ) -> Result<Scanner, String> {
        let mut specs = Vec::with_capacity(builtins.len() + patterns.len());
        for name in builtins {
            let b: Builtin = name.parse().map_err(|e: UnknownBuiltin| e.to_string())?;
            specs.push(DetectorSpec::builtin(b));
        }
        for (name, pattern) in patterns {
            specs.push(DetectorSpec::regex(name, pattern));
        }
        Scanner::new(&specs).map_err(|e| {
            let mut s = e.to_string();
            if let Some(src) = std::error::Error::source(&e) {
                s.push_str(&format!(": {src}"));
            }
            s
        })
    }

    /// Every hit in `text`, sorted and non-overlapping.
    pub fn find(&self, text: &str) -> Vec<Hit> {
        self.hits(text.as_bytes(), 0, true)
    }

    /// `text` with every hit replaced by `[REDACTED:<detector>]`, and the hits, whose offsets
    /// index `text` (not the returned string).
    pub fn redact(&self, text: &str) -> (String, Vec<Hit>) {
        let hits = self.find(text);
        (redacted(text, 0..text.len(), &hits), hits)
    }

    /// Every hit in `bytes`, which need not be UTF-8 (a request body). The detectors run on the
    /// raw bytes, with no lossy conversion, so offsets index `bytes`. The built-ins are ASCII and
    /// behave as on text; a custom pattern in Unicode mode matches only valid UTF-8, so an
    /// invalid byte is never part of a match and breaks one as a character the pattern does not
    /// accept would. Patterns can match raw bytes with `(?-u:…)`.
    pub fn scan_bytes(&self, bytes: &[u8]) -> Vec<Hit> {
        self.hits(bytes, 0, false)
    }

    /// A redactor for text that arrives in pieces; see [`StreamRedactor`].
    pub fn stream(&self) -> StreamRedactor {
        StreamRedactor::new(self.clone())
    }

    /// The hits that start at or after `from`. The bytes before `from` are context only: they
    /// decide assertions such as `\b` at `from`, as they would in a scan of the whole. `hay` is
    /// text when `whole_chars` is set, and then hits are widened to whole characters.
    pub(crate) fn hits(&self, hay: &[u8], from: usize, whole_chars: bool) -> Vec<Hit> {
        let mut spans = Vec::new();
        let mut found = Vec::new();
        for (index, detector) in self.detectors.iter().enumerate() {
            match &detector.matcher {
                Matcher::Builtin(builtin) => builtin::find(*builtin, hay, from, &mut found),
                Matcher::Regex(re) => builtin::matches(re, hay, from, &mut found),
            }
            for span in found.drain(..) {
                let span = if whole_chars { widen(hay, span) } else { span };
                spans.push((span, index));
            }
        }

        spans.sort_by_key(|(span, index)| (span.start, Reverse(span.end), *index));
        let mut hits: Vec<Hit> = Vec::with_capacity(spans.len());
        for (span, index) in spans {
            match hits.last_mut() {
                Some(last) if span.start < last.end => last.end = last.end.max(span.end),
                _ => hits.push(Hit {
                    detector: self.detectors[index].name.clone(),
                    start: span.start,
                    end: span.end,
                }),
            }
        }
        hits
    }
}

fn compile(name: &str, pattern: &str) -> Result<Regex, BuildError> {
    let re = RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|source| BuildError::Regex {
            name: name.to_owned(),
            source,
        })?;
    // The regex crate cannot say whether a pattern admits an empty match, so probe for one.
    // Scanning skips any empty match the probes miss.
    let matches_empty = EMPTY_PROBES
        .iter()
        .any(|probe| re.find_iter(probe.as_bytes()).any(|m| m.is_empty()));
    if matches_empty {
        return Err(BuildError::EmptyMatch(name.to_owned()));
    }
    Ok(re)
}

/// Widens `span` in UTF-8 text to whole characters by taking in the continuation bytes at its
/// edges.
fn widen(hay: &[u8], span: Range<usize>) -> Range<usize> {
    let continuation = |b: u8| b & 0b1100_0000 == 0b1000_0000;
    let (mut start, mut end) = (span.start, span.end);
    while start > 0 && continuation(hay[start]) {
        start -= 1;
    }
    while end < hay.len() && continuation(hay[end]) {
        end += 1;
    }
    start..end
}

/// `text[range]` with each of `hits`, which lie within `range`, replaced by its marker.
fn redacted(text: &str, range: Range<usize>, hits: &[Hit]) -> String {
    let mut out = String::with_capacity(range.len());
    let mut pos = range.start;
    for hit in hits {
        out.push_str(&text[pos..hit.start]);
        out.push_str("[REDACTED:");
        out.push_str(&hit.detector);
        out.push(']');
        pos = hit.end;
    }
    out.push_str(&text[pos..range.end]);
    out
}

#[cfg(test)]
mod tests;
