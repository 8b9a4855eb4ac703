//! The built-in detectors, as pure functions over bytes. Each appends the spans it finds that
//! start at or after `from`; the bytes before `from` are context only, read by boundary checks.
//! The patterns are ASCII, so they work the same on text and on bytes that are not UTF-8.

use std::ops::Range;
use std::sync::LazyLock;

use regex::bytes::Regex;

use crate::Builtin;

/// How far a private key block may reach from the start of its BEGIN line, END line included.
/// Without an END line within this distance, the block is taken to run to it (or to the end of
/// the text, if that comes first).
pub const PRIVATE_KEY_MAX_LEN: usize = 16 * 1024;

pub(crate) fn find(builtin: Builtin, hay: &[u8], from: usize, out: &mut Vec<Range<usize>>) {
    match builtin {
        Builtin::CardNumber => card_numbers(hay, from, out),
        Builtin::PrivateKey => private_keys(hay, from, out),
        Builtin::CloudKey => cloud_keys(hay, from, out),
        Builtin::Email => matches(&EMAIL, hay, from, out),
    }
}

/// Appends every non-empty match of `re` starting at or after `from`.
pub(crate) fn matches(re: &Regex, hay: &[u8], from: usize, out: &mut Vec<Range<usize>>) {
    let mut pos = from;
    while let Some(m) = re.find_at(hay, pos) {
        if m.is_empty() {
            // `Scanner::new` refuses patterns found to match nothing, but its probe cannot
            // prove it; an empty match that slips through redacts nothing, so step over it.
            if m.end() == hay.len() {
                break;
            }
            pos = m.end() + 1;
        } else {
            out.push(m.range());
            pos = m.end();
        }
    }
}

fn compile(pattern: &str) -> Regex {
    Regex::new(pattern).expect("built-in patterns are valid")
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Digit groups separated by single spaces or dashes: where card numbers are looked for.
static DIGIT_RUN: LazyLock<Regex> = LazyLock::new(|| compile("[0-9]+(?:[ -][0-9]+)*"));

/// How card numbers are grouped when written with separators, as group lengths, longest first:
/// 4-4-4-4 with an optional tail of 1–3 digits (16–19 digits), and 4-6-5 and 4-6-4 (American
/// Express, Diners Club).
const GROUPINGS: [&[usize]; 6] = [
    &[4, 4, 4, 4, 3],
    &[4, 4, 4, 4, 2],
    &[4, 4, 4, 4, 1],
    &[4, 4, 4, 4],
    &[4, 6, 5],
    &[4, 6, 4],
];

fn card_numbers(hay: &[u8], from: usize, out: &mut Vec<Range<usize>>) {
    let mut groups = Vec::new();
    let mut pos = from;
    while let Some(run) = DIGIT_RUN.find_at(hay, pos) {
        pos = run.end();
        groups.clear();
        let mut start = run.start();
        for (i, &b) in hay.iter().enumerate().take(run.end()).skip(run.start()) {
            if !b.is_ascii_digit() {
                groups.push(start..i);
                start = i + 1;
            }
        }
        groups.push(start..run.end());

        let mut i = 0;
        while i < groups.len() {
            match card_at(hay, &groups[i..]) {
                Some(n) => {
                    out.push(groups[i].start..groups[i + n - 1].end);
                    i += n;
                }
                None => i += 1,
            }
        }
    }
}

/// How many of `groups` (consecutive digit groups of one run) form a card number that starts
/// with the first of them, if any do.
fn card_at(hay: &[u8], groups: &[Range<usize>]) -> Option<usize> {
    let start = groups[0].start;
    if start > 0 && is_word(hay[start - 1]) {
        return None;
    }
    let is_card = |n: usize| {
        let end = groups[n - 1].end;
        let same_separator = groups[..n]
            .windows(2)
            .all(|pair| hay[pair[0].end] == hay[groups[0].end]);
        let digits: Vec<u8> = hay[start..end]
            .iter()
            .filter(|b| b.is_ascii_digit())
            .map(|b| b - b'0')
            .collect();
        same_separator
            && !hay.get(end).is_some_and(|&b| is_word(b))
            && (2..=6).contains(&digits[0])
            && luhn(&digits)
    };
    if (13..=19).contains(&groups[0].len()) && is_card(1) {
        return Some(1);
    }
    GROUPINGS
        .iter()
        .find(|lens| {
            lens.len() <= groups.len()
                && lens.iter().zip(groups).all(|(&len, g)| g.len() == len)
                && is_card(lens.len())
        })
        .map(|lens| lens.len())
}

/// The Luhn checksum that every card number carries in its last digit.
fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| match (i % 2, u32::from(d)) {
            (0, d) => d,
            (_, d) if d < 5 => 2 * d,
            (_, d) => 2 * d - 9,
        })
        .sum();
    sum.is_multiple_of(10)
}

const KEY_LABEL: &str = "((?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?)";
static PEM_BEGIN: LazyLock<Regex> =
    LazyLock::new(|| compile(&format!("-----BEGIN {KEY_LABEL}-----")));
static PEM_END: LazyLock<Regex> = LazyLock::new(|| compile(&format!("-----END {KEY_LABEL}-----")));

fn private_keys(hay: &[u8], from: usize, out: &mut Vec<Range<usize>>) {
    let mut pos = from;
    while let Some(begin) = PEM_BEGIN.captures_at(hay, pos) {
        let line = begin.get(0).expect("group 0 always matches");
        let label = &begin[1];
        let limit = hay.len().min(line.start() + PRIVATE_KEY_MAX_LEN);
        let end = PEM_END
            .captures_iter(&hay[line.end()..limit])
            .find(|end| &end[1] == label)
            .map_or(limit, |end| line.end() + end.get(0).expect("group 0").end());
        out.push(line.start()..end);
        pos = end;
    }
}

/// One alternative per kind of credential. Where an alternative has a capture group, only the
/// group is the secret: the label before it stays readable.
static CLOUD_KEY: LazyLock<Regex> = LazyLock::new(|| {
    compile(
        r#"(?x)
        # AWS access key id
          (?-u:\b) (?:AKIA|ASIA) [A-Z0-9]{16} (?-u:\b)
        # AWS secret access key, only after its label; the value must end there
        | (?i:aws[_-]?secret[_-]?(?:access[_-]?)?key|secret[_-]?access[_-]?key)
          ["']? \s{0,16} [:=] \s{0,16} ["']? ([A-Za-z0-9/+]{40}) (?: [^A-Za-z0-9/+=] | \z )
        # Google API key
        | (?-u:\b) AIza [0-9A-Za-z_-]{35}
        # GitHub tokens: classic (personal, OAuth, user-to-server, server-to-server, refresh)
        # and fine-grained
        | (?-u:\b) gh[pousr]_ [A-Za-z0-9]{36,}
        | (?-u:\b) github_pat_ [A-Za-z0-9_]{22,}
        # Slack tokens
        | (?-u:\b) xox[baprs]- [A-Za-z0-9-]{10,}
        # OpenAI and Anthropic keys (sk-…, sk-proj-…, sk-ant-…)
        | (?-u:\b) sk- [A-Za-z0-9_-]{20,}
        # Azure storage account key, as written in connection strings
        | (?-u:\b) (?i:AccountKey) = ([A-Za-z0-9+/]{86}==)
        "#,
    )
});

fn cloud_keys(hay: &[u8], from: usize, out: &mut Vec<Range<usize>>) {
    let mut pos = from;
    while let Some(caps) = CLOUD_KEY.captures_at(hay, pos) {
        let whole = caps.get(0).expect("group 0 always matches");
        let secret = caps.iter().skip(1).flatten().next().unwrap_or(whole);
        out.push(secret.range());
        pos = whole.end();
    }
}

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    compile(
        r"(?x)
        (?-u:\b) [A-Za-z0-9_%+-]+ (?: \. [A-Za-z0-9_%+-]+ )*
        @ (?: [A-Za-z0-9] (?: [A-Za-z0-9-]* [A-Za-z0-9] )? \. )+ [A-Za-z]{2,63} (?-u:\b)
        ",
    )
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_checksum() {
        let digits = |s: &str| s.bytes().map(|b| b - b'0').collect::<Vec<_>>();
        assert!(luhn(&digits("4111111111111111")));
        assert!(luhn(&digits("79927398713")));
        assert!(!luhn(&digits("4111111111111112")));
        assert!(!luhn(&digits("79927398710")));
    }

    #[test]
    fn context_before_from_is_honoured() {
        // Scanning from the middle of a word or a digit run must not start a match there.
        let mut out = Vec::new();
        find(Builtin::CloudKey, b"XAKIAIOSFODNN7EXAMPLE", 1, &mut out);
        find(Builtin::CardNumber, b"94111111111111111", 1, &mut out);
        assert!(out.is_empty());
        find(Builtin::CloudKey, b" AKIAIOSFODNN7EXAMPLE", 1, &mut out);
        assert_eq!(out.as_slice(), &[Range { start: 1, end: 21 }]);
    }
}
