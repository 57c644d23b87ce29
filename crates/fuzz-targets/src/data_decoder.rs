//! `data_decoder`: the DATA body decoder on arbitrary octets in arbitrary pieces, under both
//! bare line ending policies.
//!
//! Input: one octet of settings (policy, size and line limits), one octet seeding the random
//! splits, then the octets that follow a DATA command.
//!
//! Oracles: no panic; the same outcome (where the data ends, the defect, and the body of a
//! message without defect) however the input is split; the body of a refused or unfinished
//! message, which the decoder may drop early, always a prefix of the full body; the body never
//! larger than the input plus one octet per bare CR or LF, nor than the size limit;
//! the end found exactly where an independent reading puts it (the first CRLF "." CRLF, with
//! the CRLF before it possibly the start of the data), and under `Reject` a bare CR or LF
//! before it refused; under `Reject` the body is the unstuffed text and the defects are the
//! ones a line-by-line reading finds; without bare line endings both policies agree; and
//! `dot_stuff` of the input decodes back to the input.

use smtp_proto::codec::{BareLineEndings, DataDecoder, DataDefect, DataProgress, dot_stuff};

use crate::util::{Bytes, Split, find};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    progress: DataProgress,
    body: Vec<u8>,
    defect: Option<DataDefect>,
}

pub fn data_decoder(data: &[u8]) {
    let mut bytes = Bytes::new(data);
    let settings = bytes.byte();
    let seed = bytes.byte();
    let input = bytes.rest();
    let max_size = [u64::MAX, 0, 16, 1000][usize::from(settings >> 1 & 3)];
    let max_line = [0, 1000, 8, 78][usize::from(settings >> 3 & 3)];
    let mut outcomes = Vec::new();
    for policy in [BareLineEndings::Reject, BareLineEndings::Normalize] {
        let outcome = decode_every_way(policy, max_size, max_line, u64::from(seed), input);
        check_outcome(policy, max_size, max_line, input, &outcome);
        outcomes.push(outcome);
    }
    // Without a bare CR or LF before the end, the policy makes no difference.
    if outcomes[0].progress != DataProgress::BareLineEnding {
        let [reject, normalize] = &outcomes[..] else { unreachable!() };
        assert_eq!(
            (reject.progress, reject.defect),
            (normalize.progress, normalize.defect),
            "the policies disagree on {input:?}"
        );
        if complete(reject) {
            assert_eq!(reject.body, normalize.body, "the policies disagree on {input:?}");
        }
    }
    check_dot_stuff(input);
}

/// A message that ended without a defect: its body is kept, and must be exact.
fn complete(outcome: &Outcome) -> bool {
    matches!(outcome.progress, DataProgress::End { .. }) && outcome.defect.is_none()
}

/// Decodes `input` cut in several ways; panics unless they all agree.
fn decode_every_way(
    policy: BareLineEndings,
    max_size: u64,
    max_line: usize,
    seed: u64,
    input: &[u8],
) -> Outcome {
    // The body with no limits: every body kept under limits is a prefix of it.
    let full = decode(policy, u64::MAX, 0, &[input]).body;
    let mut first: Option<Outcome> = None;
    for split in Split::all(seed) {
        let outcome = decode(policy, max_size, max_line, &split.pieces(input));
        assert!(
            full.starts_with(&outcome.body),
            "{policy:?} with {split:?} kept a body that is not a prefix of the full one: {input:?}"
        );
        match &first {
            None => first = Some(outcome),
            Some(first) => {
                assert_eq!(
                    (outcome.progress, outcome.defect),
                    (first.progress, first.defect),
                    "{policy:?} with {split:?} disagrees with the whole input {input:?}"
                );
                if complete(first) {
                    assert_eq!(
                        outcome.body, first.body,
                        "{policy:?} with {split:?} disagrees with the whole input {input:?}"
                    );
                }
            }
        }
    }
    first.expect("at least one split")
}

fn decode(policy: BareLineEndings, max_size: u64, max_line: usize, pieces: &[&[u8]]) -> Outcome {
    let mut decoder = DataDecoder::new(policy, max_size, max_line);
    let mut body = Vec::new();
    let mut offset = 0;
    let mut progress = DataProgress::NeedMore;
    for piece in pieces {
        match decoder.decode(piece, &mut body) {
            DataProgress::NeedMore => offset += piece.len(),
            DataProgress::End { consumed } => {
                assert!(consumed <= piece.len(), "consumed {consumed} of {}", piece.len());
                progress = DataProgress::End { consumed: offset + consumed };
                break;
            }
            DataProgress::BareLineEnding => {
                progress = DataProgress::BareLineEnding;
                break;
            }
        }
    }
    let defect = match progress {
        DataProgress::End { .. } => decoder.defect(),
        _ => None,
    };
    Outcome { progress, body, defect }
}

fn check_outcome(
    policy: BareLineEndings,
    max_size: u64,
    max_line: usize,
    input: &[u8],
    outcome: &Outcome,
) {
    let used = match outcome.progress {
        DataProgress::End { consumed } => &input[..consumed],
        _ => input,
    };
    let line_endings = used.iter().filter(|&&b| b == b'\r' || b == b'\n').count();
    assert!(
        outcome.body.len() <= used.len() + line_endings,
        "{policy:?}: body of {} octets from {} octets of input",
        outcome.body.len(),
        used.len()
    );
    assert!(outcome.body.len() as u64 <= max_size, "body over the size limit");

    // The end of data is the first CRLF "." CRLF, where the data itself starts after a CRLF.
    let end = find(&[b"\r\n", input].concat(), b"\r\n.\r\n").map(|at| at + 3);
    let bare = first_bare_line_ending(input);
    let expected = match (policy, end, bare) {
        (BareLineEndings::Reject, _, Some(bare)) if end.is_none_or(|end| bare < end) => {
            DataProgress::BareLineEnding
        }
        (_, Some(end), _) => DataProgress::End { consumed: end },
        (_, None, _) => DataProgress::NeedMore,
    };
    assert_eq!(outcome.progress, expected, "{policy:?}: the end of {input:?}");

    if policy == BareLineEndings::Normalize && outcome.defect != Some(DataDefect::TooBig) {
        assert_eq!(
            first_bare_line_ending(&outcome.body),
            None,
            "a bare line ending left in the normalized body {:?}",
            outcome.body
        );
    }
    if let (BareLineEndings::Reject, DataProgress::End { consumed }) = (policy, outcome.progress) {
        // Line by line: every line but the final "." loses one leading dot.
        let text = &input[..consumed - 3];
        let mut body = Vec::new();
        let mut long_line = false;
        for line in text.split_inclusive(|&b| b == b'\n') {
            long_line |= max_line != 0 && line.len() > max_line;
            body.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        let too_big = body.len() as u64 > max_size;
        let defect = if too_big {
            Some(DataDefect::TooBig)
        } else if long_line {
            Some(DataDefect::LineTooLong)
        } else {
            None
        };
        assert_eq!(outcome.defect, defect, "defect of {input:?}");
        if defect.is_none() {
            assert_eq!(outcome.body, body, "body of {input:?}");
        } else {
            assert!(body.starts_with(&outcome.body), "the kept body is not a prefix");
        }
    }
}

/// Index of the first CR not followed by LF (with something after it) or LF not preceded by CR.
fn first_bare_line_ending(data: &[u8]) -> Option<usize> {
    (0..data.len()).find(|&i| match data[i] {
        b'\n' => i == 0 || data[i - 1] != b'\r',
        b'\r' => data.get(i + 1).is_some_and(|&next| next != b'\n'),
        _ => false,
    })
}

/// `dot_stuff` makes any content safe to send: it decodes, under `Reject`, to the content with
/// each bare CR or LF made CRLF and a final CRLF added where missing, ending exactly where the
/// stuffed data ends.
fn check_dot_stuff(content: &[u8]) {
    let mut wire = Vec::new();
    dot_stuff(content, &mut wire);
    let mut expected = Vec::with_capacity(content.len() + 2);
    let mut i = 0;
    while i < content.len() {
        match content[i] {
            b'\r' if content.get(i + 1) == Some(&b'\n') => {
                expected.extend_from_slice(b"\r\n");
                i += 2;
                continue;
            }
            b'\r' | b'\n' => expected.extend_from_slice(b"\r\n"),
            b => expected.push(b),
        }
        i += 1;
    }
    if !expected.is_empty() && !expected.ends_with(b"\r\n") {
        expected.extend_from_slice(b"\r\n");
    }
    let mut decoder = DataDecoder::new(BareLineEndings::Reject, u64::MAX, 0);
    let mut body = Vec::new();
    assert_eq!(
        decoder.decode(&wire, &mut body),
        DataProgress::End { consumed: wire.len() },
        "dot_stuff of {content:?} gave {wire:?}"
    );
    assert_eq!(body, expected, "dot_stuff of {content:?} gave {wire:?}");
}
