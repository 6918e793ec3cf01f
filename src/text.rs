//! Bounded text: whatever reaches a header, a log line or an error message
//! from input or from a remote answer is cut to a documented size, with the
//! original length noted (docs/operations.md, "Bounded output").

/// The longest value herald writes into one `x-herald-*` header, and into one
/// field of a log line, in bytes.
pub const MAX_FIELD_BYTES: usize = 1024;

/// `text` whole if it fits in `max` bytes, else its longest prefix that ends
/// on a character boundary and leaves room for a note of the original size.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let note = format!("… [{} bytes]", text.len());
    let mut end = max.saturating_sub(note.len());
    while end > 0 && !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{note}", &text[..end])
}

/// [`clip`] at [`MAX_FIELD_BYTES`].
pub fn field(text: &str) -> String {
    clip(text, MAX_FIELD_BYTES)
}

/// An error with its causes, each once, bounded to [`MAX_FIELD_BYTES`]: for
/// `x-herald-error` and log lines.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    field(&causes(err))
}

/// An error with its causes joined by `: `, each once: a cause whose text
/// its error already quotes is not repeated. Unbounded, for the CLI's last
/// word.
pub fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept_and_long_text_is_cut_with_its_length() {
        assert_eq!(clip("abc", 10), "abc");
        let long = "é".repeat(1000);
        let cut = clip(&long, 100);
        assert!(cut.len() <= 100, "{}", cut.len());
        assert!(cut.ends_with("… [2000 bytes]"), "{cut}");
        assert!(cut.starts_with("éé"));
        assert_eq!(field(&"x".repeat(150_000)).len(), MAX_FIELD_BYTES);
        assert_eq!(clip("abcdef", 0), "… [6 bytes]");
    }

    #[test]
    fn a_cause_already_quoted_is_written_once() {
        let io = std::io::Error::other("no exchange 'p.jobs'");
        let quoting = anyhow::Error::new(io).context("confirm failed: no exchange 'p.jobs'").context("publishing job 7");
        assert_eq!(causes(quoting.as_ref()), "publishing job 7: confirm failed: no exchange 'p.jobs'");
        let plain = anyhow::Error::new(std::io::Error::other("refused")).context("connecting");
        assert_eq!(causes(plain.as_ref()), "connecting: refused");
        assert_eq!(error_chain(anyhow::anyhow!("{}", "x".repeat(5000)).as_ref()).len(), MAX_FIELD_BYTES);
    }
}
