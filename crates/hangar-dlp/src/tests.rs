use super::*;

fn builtins() -> Scanner {
    let specs: Vec<_> = Builtin::ALL
        .into_iter()
        .map(DetectorSpec::builtin)
        .collect();
    Scanner::new(&specs).unwrap()
}

fn only(builtin: Builtin) -> Scanner {
    Scanner::new(&[DetectorSpec::builtin(builtin)]).unwrap()
}

/// The matched texts of `detector`'s hits in `text`.
fn found<'t>(scanner: &Scanner, text: &'t str) -> Vec<&'t str> {
    scanner
        .find(text)
        .iter()
        .map(|hit| &text[hit.start..hit.end])
        .collect()
}

fn check(builtin: Builtin, text: &str, expect: &[&str]) {
    assert_eq!(found(&only(builtin), text), expect, "in {text:?}");
}

/// A fake PEM body of `lines` lines of 64 base64 characters.
fn pem_body(lines: usize) -> String {
    let line = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj";
    vec![line; lines].join("\n")
}

fn pem(label: &str, lines: usize) -> String {
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----",
        pem_body(lines)
    )
}

#[test]
fn builtin_names_round_trip() {
    for builtin in Builtin::ALL {
        assert_eq!(builtin.as_str().parse(), Ok(builtin));
        assert_eq!(builtin.to_string(), builtin.as_str());
    }
    assert_eq!(
        "credit_card".parse::<Builtin>(),
        Err(UnknownBuiltin("credit_card".into()))
    );
}

#[test]
fn card_numbers() {
    let valid = [
        "4111111111111111",
        "4012888888881881",
        "4222222222222",
        "5555555555554444",
        "2223003122003222",
        "378282246310005",
        "30569309025904",
        "6011111111111117",
        "3530111333300000",
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "3782 822463 10005",
        "3056-930902-5904",
    ];
    for card in valid {
        check(Builtin::CardNumber, card, &[card]);
        let text = format!("card: {card}, exp 12/29");
        check(Builtin::CardNumber, &text, &[card]);
    }
    let invalid = [
        // Luhn fails.
        "4111111111111112",
        "4111 1111 1111 1112",
        // Too short, too long.
        "411111111111",
        "41111111111111111111",
        // Outside the networks' first digits (a millisecond timestamp passing Luhn).
        "1700000000004",
        "0000000000000000",
        // Separators mixed, doubled, or in other groupings.
        "4111 1111-1111 1111",
        "4111  1111 1111 1111",
        "4111.1111.1111.1111",
        "41 1111 1111 1111 11",
        // Part of a longer digit run, a hex string or an identifier.
        "94111111111111111",
        "4111111111111111000",
        "ab4111111111111111",
        "4111111111111111cd",
        "card_4111111111111111",
    ];
    for text in invalid {
        check(Builtin::CardNumber, text, &[]);
    }
}

#[test]
fn card_numbers_beside_other_digit_groups() {
    check(
        Builtin::CardNumber,
        "exp 12 4111 1111 1111 1111 cvv 123",
        &["4111 1111 1111 1111"],
    );
    // A trailing group that breaks the checksum is left out; one that keeps it is taken in.
    check(
        Builtin::CardNumber,
        "4111 1111 1111 1111 123",
        &["4111 1111 1111 1111"],
    );
    check(
        Builtin::CardNumber,
        "6011 0009 9013 9424 1 and 4111111111111111-2",
        &["6011 0009 9013 9424", "4111111111111111"],
    );
}

#[test]
fn private_keys() {
    for label in [
        "PRIVATE KEY",
        "RSA PRIVATE KEY",
        "EC PRIVATE KEY",
        "DSA PRIVATE KEY",
        "OPENSSH PRIVATE KEY",
        "ENCRYPTED PRIVATE KEY",
        "PGP PRIVATE KEY BLOCK",
    ] {
        let key = pem(label, 3);
        check(
            Builtin::PrivateKey,
            &format!("key:\n{key}\nthat was it"),
            &[&key],
        );
    }
    // As a JSON string, with escaped newlines.
    let json = r#"{"private_key": "-----BEGIN PRIVATE KEY-----\nMIIEvQ==\n-----END PRIVATE KEY-----\n", "x": 1}"#;
    check(
        Builtin::PrivateKey,
        json,
        &[r"-----BEGIN PRIVATE KEY-----\nMIIEvQ==\n-----END PRIVATE KEY-----"],
    );
    // Public keys and certificates are not secrets.
    check(
        Builtin::PrivateKey,
        "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----\n-----BEGIN CERTIFICATE-----",
        &[],
    );
}

#[test]
fn private_key_without_end_runs_to_the_end_or_the_limit() {
    let truncated = format!("-----BEGIN RSA PRIVATE KEY-----\n{}", pem_body(2));
    check(
        Builtin::PrivateKey,
        &format!("here: {truncated}"),
        &[&truncated],
    );
    // An END line of another label does not close the block.
    let mismatched = format!("{truncated}\n-----END EC PRIVATE KEY-----\nbye");
    check(Builtin::PrivateKey, &mismatched, &[&mismatched]);

    let long = format!(
        "-----BEGIN PRIVATE KEY-----\nx{}",
        "é".repeat(PRIVATE_KEY_MAX_LEN)
    );
    let hits = only(Builtin::PrivateKey).find(&long);
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].start, 0);
    // The limit falls inside a two-byte character, which is taken in whole.
    assert_eq!(hits[0].end, PRIVATE_KEY_MAX_LEN + 1);
}

#[test]
fn cloud_keys() {
    let google = format!("AIza{}", "SyA-9_bcdefghijklmnopqrstuvwxyz0123");
    let github = format!("ghp_{}", "16C7e42F292c6912E7710c838347Ae178B4a");
    let fine_grained = format!("github_pat_11ABCDEFG0{}", "a1_".repeat(25));
    let azure_key = format!(
        "{}==",
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsu".repeat(2)[..86].to_owned()
    );
    assert_eq!(google.len(), 39);
    assert_eq!(github.len(), 40);
    assert_eq!(azure_key.len(), 88);
    let keys = [
        "AKIAIOSFODNN7EXAMPLE",
        "ASIAY34FZKBOKMUTVV7A",
        &google,
        &github,
        "gho_16C7e42F292c6912E7710c838347Ae178B4a",
        &fine_grained,
        "xoxb-2048239123-5813475230123-aBcDeFgHiJkLmNoPqRsTuVwX",
        "xoxp-1234567890-abcdefghij",
        "sk-proj-abcDEF123_ghiJKL456-mnoPQR789",
        "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789-ABCDEFG",
        "sk-abcdefghijklmnopqrstuvwxyz012345678901234567",
    ];
    for key in keys {
        check(Builtin::CloudKey, key, &[key]);
        check(Builtin::CloudKey, &format!("token=\"{key}\";"), &[key]);
    }

    let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    for labelled in [
        format!("aws_secret_access_key = {secret}\n"),
        format!("export AWS_SECRET_ACCESS_KEY='{secret}'"),
        format!(r#"{{"SecretAccessKey": "{secret}"}}"#),
        format!("aws-secret-key: {secret}"),
    ] {
        check(Builtin::CloudKey, &labelled, &[secret]);
    }
    let connection = format!(
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={azure_key};EndpointSuffix=core.windows.net"
    );
    check(Builtin::CloudKey, &connection, &[&azure_key]);

    for text in [
        // Unlabelled secret; a labelled value of the wrong length.
        secret,
        &format!("aws_secret_access_key = {secret}x"),
        // Run into other letters, or the wrong case.
        "XAKIAIOSFODNN7EXAMPLE",
        "AKIAIOSFODNN7EXAMPLEX",
        "akiaiosfodnn7example",
        // Too short.
        "ghp_abc",
        "sk-short",
        "task-abcdefghijklmnopqrstuvwxyz",
        "xoxb-123",
    ] {
        check(Builtin::CloudKey, text, &[]);
    }
}

#[test]
fn emails() {
    for (text, expect) in [
        ("alice@example.com", &["alice@example.com"][..]),
        (
            "Write to first.last+tag@mail.example.co.uk.",
            &["first.last+tag@mail.example.co.uk"],
        ),
        ("<mailto:bob_99@ex-ample.org>", &["bob_99@ex-ample.org"]),
        ("a@b.io, c@d.dev", &["a@b.io", "c@d.dev"]),
        ("root@localhost", &[]),
        ("a@b.c", &[]),
        ("npm i pkg@1.2.3", &[]),
        ("@scope/pkg", &[]),
        ("x@-bad.com", &[]),
        ("x@example.com1", &[]),
        ("user@[10.0.0.1]", &[]),
    ] {
        check(Builtin::Email, text, expect);
    }
}

#[test]
fn overlapping_detectors_become_one_hit() {
    let scanner = Scanner::new(&[
        DetectorSpec::builtin(Builtin::CardNumber),
        DetectorSpec::regex("order", r"order #[0-9]{4}"),
        DetectorSpec::regex("ref", r"ref-[0-9]+"),
    ])
    .unwrap();
    // The custom match starts first and covers the card.
    let text = "ref-4111111111111111 ok";
    assert_eq!(
        scanner.redact(text),
        (
            "[REDACTED:ref] ok".to_owned(),
            vec![Hit {
                detector: "ref".into(),
                start: 0,
                end: 20,
            }]
        )
    );
    // The custom match starts first but ends inside the card: the hit covers both.
    let text = "order #4111 1111 1111 1111 ok";
    assert_eq!(scanner.redact(text).0, "[REDACTED:order] ok");
}

#[test]
fn custom_regex() {
    let scanner =
        Scanner::new(&[DetectorSpec::regex("codename", r"(?i)\bproject\s+falcon\b")]).unwrap();
    let (text, hits) = scanner.redact("About Project  Falcon and project falconry.");
    assert_eq!(text, "About [REDACTED:codename] and project falconry.");
    assert_eq!(
        hits,
        [Hit {
            detector: "codename".into(),
            start: 6,
            end: 21,
        }]
    );
}

#[test]
fn bad_detectors_are_refused_by_name() {
    let err = |specs: &[DetectorSpec]| Scanner::new(specs).unwrap_err();
    assert!(matches!(
        err(&[DetectorSpec::regex("unclosed", "(abc")]),
        BuildError::Regex { name, .. } if name == "unclosed"
    ));
    assert!(matches!(
        err(&[DetectorSpec::regex("huge", r"\w{5000}")]),
        BuildError::Regex { name, .. } if name == "huge"
    ));
    for pattern in ["a*", "x?", r"\b", "(?m)^", "$", "foo|", r"\Bx*"] {
        assert!(
            matches!(
                err(&[DetectorSpec::regex("empty", pattern)]),
                BuildError::EmptyMatch(name) if name == "empty"
            ),
            "{pattern}"
        );
    }
    assert!(matches!(
        err(&[
            DetectorSpec::builtin(Builtin::Email),
            DetectorSpec::regex("email", "x"),
        ]),
        BuildError::DuplicateName(name) if name == "email"
    ));
    for name in ["", "with space", "close]", &"n".repeat(65)] {
        assert!(matches!(
            err(&[DetectorSpec::regex(name, "x")]),
            BuildError::Name(_)
        ));
    }
    assert_eq!(
        err(&[DetectorSpec::regex("empty", "a*")]).to_string(),
        "detector \"empty\": the regex can match the empty string; make it match at least one character"
    );
}

#[test]
fn redact_output() {
    let scanner = builtins();
    let text = "Card 4111-1111-1111-1111, mail ops@example.com, key AKIAIOSFODNN7EXAMPLE.\n\
                -----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\nDone.";
    let (redacted, hits) = scanner.redact(text);
    assert_eq!(
        redacted,
        "Card [REDACTED:card_number], mail [REDACTED:email], key [REDACTED:cloud_key].\n\
         [REDACTED:private_key]\nDone."
    );
    let names: Vec<_> = hits.iter().map(|h| h.detector.as_str()).collect();
    assert_eq!(names, ["card_number", "email", "cloud_key", "private_key"]);
    assert_eq!(
        scanner.redact("nothing here"),
        ("nothing here".into(), vec![])
    );
}

#[test]
fn scan_bytes_on_invalid_utf8() {
    let scanner = builtins();
    let body = b"\xff\xfe{\"k\":\"AKIAIOSFODNN7EXAMPLE\"}\xc3 to=alice@example.com\x80";
    let hits = scanner.scan_bytes(body);
    let texts: Vec<_> = hits.iter().map(|h| &body[h.start..h.end]).collect();
    assert_eq!(
        texts,
        [&b"AKIAIOSFODNN7EXAMPLE"[..], &b"alice@example.com"[..]]
    );

    let raw = Scanner::new(&[DetectorSpec::regex("raw", r"(?-u:\xff\xfe)")]).unwrap();
    assert_eq!(raw.scan_bytes(body).len(), 1);
}

#[test]
fn scanner_is_shareable() {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<Scanner>();
    shareable::<StreamRedactor>();
}

/// Streams `pieces` and checks the result against redacting the whole at once.
fn check_stream(scanner: &Scanner, pieces: &[&str]) {
    let whole = pieces.concat();
    let mut stream = scanner.stream();
    let (mut text, mut hits) = (String::new(), Vec::new());
    for piece in pieces {
        let (t, h) = stream.push(piece);
        text += &t;
        hits.extend(h);
    }
    let (t, h) = stream.finish();
    text += &t;
    hits.extend(h);
    assert_eq!((text, hits), scanner.redact(&whole), "pieces {pieces:?}");
}

#[test]
fn stream_catches_secrets_split_anywhere() {
    let scanner = builtins();
    let prose = "Here is what I found in the repository you asked me to look at. ".repeat(5);
    for secret in ["4111 1111 1111 1111".to_owned(), pem("RSA PRIVATE KEY", 30)] {
        let whole = format!("{prose}{secret} is the secret.\n{prose}");
        let start = whole.find(&secret).unwrap();
        for split in 0..=whole.len() {
            check_stream(&scanner, &[&whole[..split], &whole[split..]]);
        }
        // Exactly once, where redacting the whole finds it.
        let (_, hits) = scanner.redact(&whole);
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].start..hits[0].end, start..start + secret.len());
    }
}

#[test]
fn stream_never_splits_characters() {
    let scanner = builtins();
    let whole =
        "Grüße aus 東京 🎉, écrivez à zoe@example.com — carte 4111 1111 1111 1111 ✓ ".repeat(8);
    assert_eq!(scanner.find(&whole).len(), 16);
    let boundaries: Vec<usize> = (0..=whole.len())
        .filter(|&i| whole.is_char_boundary(i))
        .collect();
    for &split in &boundaries {
        check_stream(&scanner, &[&whole[..split], &whole[split..]]);
    }
    let chars: Vec<&str> = boundaries.windows(2).map(|w| &whole[w[0]..w[1]]).collect();
    check_stream(&scanner, &chars);
}

#[test]
fn stream_matches_whole_redaction() {
    let scanner = Scanner::new(&[
        DetectorSpec::builtin(Builtin::CardNumber),
        DetectorSpec::builtin(Builtin::PrivateKey),
        DetectorSpec::builtin(Builtin::CloudKey),
        DetectorSpec::builtin(Builtin::Email),
        DetectorSpec::regex("ticket", r"\bTCK-[0-9]{6}\b"),
    ])
    .unwrap();
    let whole = format!(
        "Summary for ops@example.com: the deploy used AKIAIOSFODNN7EXAMPLE and {}; \
         ticket TCK-123456 (not TCK-1234567). Card 5555 5555 5555 4444 was charged, \
         order 12345678901234567890 too. {}\nAlso sk-ant-api03-{} leaked. Ünïcödé ✓ {}",
        "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
        pem("OPENSSH PRIVATE KEY", 12),
        "x".repeat(120),
        "filler text ".repeat(40),
    );
    let boundaries: Vec<usize> = (0..=whole.len())
        .filter(|&i| whole.is_char_boundary(i))
        .collect();
    for size in [1, 2, 3, 7, 13, 64, 255, 256, 257, 1000] {
        let pieces: Vec<&str> = boundaries
            .iter()
            .step_by(size)
            .chain([&whole.len()])
            .collect::<Vec<_>>()
            .windows(2)
            .map(|w| &whole[*w[0]..*w[1]])
            .collect();
        check_stream(&scanner, &pieces);
    }
}

#[test]
fn stream_holds_a_bounded_amount() {
    // How many input bytes a released chunk stands for.
    fn input_len(text: &str, hits: &[Hit]) -> usize {
        let markers: usize = hits
            .iter()
            .map(|h| "[REDACTED:]".len() + h.detector.len())
            .sum();
        let redacted: usize = hits.iter().map(|h| h.end - h.start).sum();
        text.len() - markers + redacted
    }
    let scanner = Scanner::new(&[DetectorSpec::regex("secret", "secret=[a-z]+")]).unwrap();
    let mut stream = scanner.stream();
    let (mut pushed, mut released) = (0, 0);
    let mut hits = Vec::new();
    for piece in std::iter::once("secret=".to_owned()).chain(vec!["abcdefghij".repeat(100); 100]) {
        pushed += piece.len();
        let (text, h) = stream.push(&piece);
        released += input_len(&text, &h);
        hits.extend(h);
        assert!(pushed - released < MAX_HELD + HOLD_BACK);
    }
    // The open match was cut at the limit and its first part released redacted.
    assert_eq!(hits[0].start, 0);
    assert!(hits[0].end > MAX_HELD);
    let (text, h) = stream.finish();
    assert_eq!(released + input_len(&text, &h), pushed);
}
