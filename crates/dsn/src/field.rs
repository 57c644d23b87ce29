//! Text that goes into header fields, DSN fields and the explanation: cleaning values that come
//! from outside, folding long fields and wrapping prose.
//!
//! RFC 5322 section 2.1.1: "Each line of characters MUST be no more than 998 characters, and
//! SHOULD be no more than 78 characters, excluding the CRLF." Everything written through this
//! module keeps to 78 where there is whitespace to break at, and always to 998.

/// The SHOULD of RFC 5322 section 2.1.1.
const FOLD_AT: usize = 78;

/// Explanation lines are kept a little shorter than header lines, as mail readers quote them.
const WRAP_AT: usize = 76;

/// The longest run without whitespace put on one line. Longer runs (no valid address or reply
/// has one) are cut, which adds a space where they were cut; 900 plus a field name or an indent
/// stays well below the 998-octet limit.
const MAX_WORD: usize = 900;

/// Replaces what must not reach a header field or a DSN field: every control character
/// (CR and LF above all, which would start a new field or end the header section) becomes
/// `?`, a tab becomes a space. Without `utf8` (a 7-bit notice) non-ASCII characters become `?`
/// too; with it they stay (RFC 6533 section 4.1: fields of message/global-delivery-status
/// "MAY contain UTF-8 characters").
pub(crate) fn clean(value: &str, utf8: bool) -> String {
    value
        .chars()
        .map(|c| match c {
            '\t' => ' ',
            c if c.is_control() => '?',
            c if !utf8 && !c.is_ascii() => '?',
            c => c,
        })
        .collect()
}

/// [`clean`] for a single token such as a host name, which is followed by a comment or must
/// stay one word: whitespace and parentheses become `?` too, so that a client's HELO name
/// cannot open or close a comment.
pub(crate) fn clean_word(value: &str, utf8: bool) -> String {
    clean(value, utf8)
        .chars()
        .map(|c| if c == ' ' || c == '(' || c == ')' { '?' } else { c })
        .collect()
}

/// [`clean`] for text of several lines (a multi-line SMTP reply): the lines, ended by LF or
/// CRLF, are cleaned one by one and joined with `\n`, which [`push_field`] and the explanation
/// turn into line breaks of their own.
pub(crate) fn clean_lines(text: &str, utf8: bool) -> String {
    text.split('\n')
        .map(|line| clean(line.strip_suffix('\r').unwrap_or(line), utf8))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Appends `name: value` and CRLF, folded at spaces so that lines stay within 78 octets where
/// possible. A `\n` in `value` forces a new continuation line (the lines of a multi-line SMTP
/// reply, RFC 3461 section 9.2: "it is necessary to insert a SPACE before each line after the
/// first"). `value` must otherwise be [`clean`]. Leading and trailing spaces are dropped, and
/// so are empty lines, since RFC 5322 section 3.2.2 forbids a folded line of only white space.
pub(crate) fn push_field(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push(':');
    let mut line_len = name.len() + 1;
    let mut first_line = true;
    for segment in value.split('\n') {
        let segment = segment.trim_matches(' ');
        if segment.is_empty() {
            continue;
        }
        if !first_line {
            out.push_str("\r\n");
            line_len = 0;
        }
        first_line = false;
        let mut line_has_word = false;
        for word in segment.split(' ') {
            for piece in pieces(word) {
                // Folding before an empty piece would leave a line of only white space; the
                // space it stands for goes on the current line instead.
                if line_has_word && !piece.is_empty() && line_len + 1 + piece.len() > FOLD_AT {
                    out.push_str("\r\n");
                    line_len = 0;
                }
                out.push(' ');
                out.push_str(piece);
                line_len += 1 + piece.len();
                line_has_word = true;
            }
        }
    }
    out.push_str("\r\n");
}

/// Appends `text` as lines of about 76 octets, each starting with `indent` and ending with
/// CRLF. Runs of white space collapse to one space, which is fine for prose.
pub(crate) fn push_wrapped(out: &mut String, indent: &str, text: &str) {
    let mut line_len = 0;
    for word in text.split_whitespace() {
        for piece in pieces(word) {
            if line_len > 0 && line_len + 1 + piece.len() > WRAP_AT {
                out.push_str("\r\n");
                line_len = 0;
            }
            if line_len == 0 {
                out.push_str(indent);
                line_len = indent.len();
            } else {
                out.push(' ');
                line_len += 1;
            }
            out.push_str(piece);
            line_len += piece.len();
        }
    }
    if line_len > 0 {
        out.push_str("\r\n");
    }
}

/// `word` cut into pieces of at most [`MAX_WORD`] octets, at character boundaries. An empty
/// word gives one empty piece, so that [`push_field`] keeps runs of spaces.
fn pieces(mut word: &str) -> Vec<&str> {
    let mut pieces = Vec::with_capacity(1);
    while word.len() > MAX_WORD {
        let mut cut = MAX_WORD;
        while !word.is_char_boundary(cut) {
            cut -= 1;
        }
        pieces.push(&word[..cut]);
        word = &word[cut..];
    }
    pieces.push(word);
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<&str> {
        text.strip_suffix("\r\n").unwrap().split("\r\n").collect()
    }

    /// Undoes folding (RFC 5322 section 2.2.3): removes each CRLF before white space.
    fn unfold(field: &str) -> String {
        field.trim_end_matches("\r\n").replace("\r\n ", " ")
    }

    #[test]
    fn clean_replaces_controls_and_non_ascii_when_asked() {
        assert_eq!(clean("a\r\nb\0c\td\u{7f}e\u{85}", false), "a??b?c d?e?");
        assert_eq!(clean("jörg@bücher.example", false), "j?rg@b?cher.example");
        assert_eq!(clean("jörg@bücher.example", true), "jörg@bücher.example");
        assert_eq!(clean_word("evil (x) y\r\n", true), "evil??x??y??");
    }

    #[test]
    fn short_field_stays_on_one_line() {
        let mut out = String::new();
        push_field(&mut out, "Action", "failed");
        assert_eq!(out, "Action: failed\r\n");
    }

    #[test]
    fn empty_value_has_no_trailing_space() {
        let mut out = String::new();
        push_field(&mut out, "Original-Envelope-Id", "");
        assert_eq!(out, "Original-Envelope-Id:\r\n");
    }

    #[test]
    fn long_field_folds_at_spaces_and_unfolds_to_the_same_value() {
        let value = "smtp; 550 5.1.1 <someone@example.org>: Recipient address rejected: \
                     User unknown in virtual mailbox table, please check the address";
        let mut out = String::new();
        push_field(&mut out, "Diagnostic-Code", value);
        let lines = lines(&out);
        assert!(lines.len() > 1);
        assert!(lines.iter().all(|l| l.len() <= FOLD_AT));
        assert!(lines[1..].iter().all(|l| l.starts_with(' ')));
        assert_eq!(unfold(&out), format!("Diagnostic-Code: {value}"));
    }

    #[test]
    fn forced_lines_start_continuations_and_empty_lines_vanish() {
        let mut out = String::new();
        let value = clean_lines("smtp; 550-first\r\n\n550 second\r\r\n", false);
        assert_eq!(value, "smtp; 550-first\n\n550 second?\n");
        push_field(&mut out, "Diagnostic-Code", &value);
        assert_eq!(out, "Diagnostic-Code: smtp; 550-first\r\n 550 second?\r\n");
    }

    #[test]
    fn runs_of_spaces_never_make_a_blank_line() {
        let value = format!("{}      {}", "a".repeat(74), "b".repeat(10));
        let mut out = String::new();
        push_field(&mut out, "X", &value);
        assert!(lines(&out).iter().all(|l| !l.trim().is_empty()));
        assert_eq!(unfold(&out), format!("X: {value}"));
    }

    #[test]
    fn endless_word_is_cut_below_998() {
        let value = "é".repeat(2000);
        let mut out = String::new();
        push_field(&mut out, "Final-Recipient", &value);
        let lines = lines(&out);
        assert_eq!(lines.len(), 5);
        assert!(lines.iter().all(|l| l.len() <= 998));
        assert_eq!(unfold(&out).replace(' ', ""), format!("Final-Recipient:{value}"));
    }

    #[test]
    fn wrapped_text_has_indent_and_width() {
        let mut out = String::new();
        let text = "word ".repeat(40);
        push_wrapped(&mut out, "    ", &text);
        let lines = lines(&out);
        assert!(lines.len() > 2);
        assert!(lines.iter().all(|l| l.starts_with("    word") && l.len() <= WRAP_AT));
        let mut out = String::new();
        push_wrapped(&mut out, "  ", &"x".repeat(1500));
        assert!(lines_ok(&out));
        push_wrapped(&mut out, "  ", "");
        assert!(lines_ok(&out));
    }

    fn lines_ok(text: &str) -> bool {
        lines(text).iter().all(|l| l.len() <= 998 && !l.trim().is_empty())
    }
}
