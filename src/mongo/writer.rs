//! A BSON document written front to back into one buffer, each document's
//! length filled in when it closes: for the statements the ledger writes for
//! every job, where `rawdoc!` builds each nested document in a buffer of its
//! own, copies it into its parent, and grows every buffer as it goes (tens of
//! thousands of instructions for one claim, in a callgrind profile of the
//! drain). Only what those statements need: documents, arrays, strings,
//! 32- and 64-bit integers, booleans and documents already built.
//!
//! Keys are the caller's constants: a key with a NUL byte would end early,
//! which `debug_assert!` catches in tests. String values may hold any UTF-8,
//! NUL included (BSON strings carry their length).

use mongodb::bson::{RawDocument, RawDocumentBuf};

/// The NUL that ends a BSON string, counted in its length.
const TRAILING_NUL: usize = 1;

pub(super) struct Writer {
    buf: Vec<u8>,
    /// Where each open document's length goes, and how many elements an open
    /// array has (its next key), innermost last.
    open: Vec<(usize, Option<u32>)>,
    /// Scratch for array keys ("0", "1", ...).
    index: String,
}

impl Writer {
    pub fn with_capacity(bytes: usize) -> Self {
        let mut writer = Self { buf: Vec::with_capacity(bytes), open: Vec::with_capacity(8), index: String::new() };
        writer.open_at(None);
        writer
    }

    /// The document, every nested one closed.
    pub fn finish(mut self) -> RawDocumentBuf {
        assert_eq!(self.open.len(), 1, "a nested document or array was left open");
        self.close();
        RawDocumentBuf::from_bytes(self.buf).expect("the writer writes well-formed BSON")
    }

    /// Open a document as the value of `key`.
    pub fn doc(&mut self, key: &str) -> &mut Self {
        self.element(0x03, key);
        self.open_at(None);
        self
    }

    /// Open an array as the value of `key`.
    pub fn array(&mut self, key: &str) -> &mut Self {
        self.element(0x04, key);
        self.open_at(Some(0));
        self
    }

    /// Close the innermost open document or array.
    pub fn end(&mut self) -> &mut Self {
        assert!(self.open.len() > 1, "end() without an open document");
        self.close();
        self
    }

    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.element(0x02, key);
        let len = i32::try_from(value.len() + TRAILING_NUL).expect("a string under 2 GiB");
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(0);
        self
    }

    pub fn i32(&mut self, key: &str, value: i32) -> &mut Self {
        self.element(0x10, key);
        self.buf.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub fn i64(&mut self, key: &str, value: i64) -> &mut Self {
        self.element(0x12, key);
        self.buf.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub fn bool(&mut self, key: &str, value: bool) -> &mut Self {
        self.element(0x08, key);
        self.buf.push(u8::from(value));
        self
    }

    /// A document built before (a constant part), copied as it is.
    pub fn raw(&mut self, key: &str, value: &RawDocument) -> &mut Self {
        self.element(0x03, key);
        self.buf.extend_from_slice(value.as_bytes());
        self
    }

    /// `{ "$literal": value }`: a value from outside (an id, a token) in an
    /// update pipeline, where a string starting with `$` would otherwise be
    /// read as a field path.
    pub fn literal(&mut self, key: &str, value: &str) -> &mut Self {
        self.doc(key).str("$literal", value).end()
    }

    /// The element's type and key; inside an array the key is the next index
    /// and `key` is ignored (pass "").
    fn element(&mut self, kind: u8, key: &str) {
        self.buf.push(kind);
        match self.open.last_mut() {
            Some((_, Some(next))) => {
                if *next < 10 {
                    self.buf.push(b'0' + *next as u8);
                } else {
                    use std::fmt::Write as _;
                    self.index.clear();
                    let _ = write!(self.index, "{next}");
                    self.buf.extend_from_slice(self.index.as_bytes());
                }
                *next += 1;
            }
            _ => {
                debug_assert!(!key.as_bytes().contains(&0), "a key with a NUL byte");
                self.buf.extend_from_slice(key.as_bytes());
            }
        }
        self.buf.push(0);
    }

    fn open_at(&mut self, array: Option<u32>) {
        self.open.push((self.buf.len(), array));
        self.buf.extend_from_slice(&[0; 4]);
    }

    fn close(&mut self) {
        let (at, _) = self.open.pop().expect("an open document");
        self.buf.push(0);
        let len = i32::try_from(self.buf.len() - at).expect("a document under 2 GiB");
        self.buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use mongodb::bson::rawdoc;

    use super::Writer;

    #[test]
    fn it_writes_the_same_bytes_as_rawdoc_for_nested_documents_arrays_and_every_kind_of_value() {
        let constant = rawdoc! { "$gt": ["$a", 1_i64] };
        let mut w = Writer::with_capacity(16);
        w.doc("q").str("_id", "k\u{0}ey $ é").end();
        w.array("u")
            .doc("")
            .raw("c", &constant)
            .array("list")
            .str("", "$$ROOT")
            .doc("")
            .end()
            .i64("", -5)
            .bool("", false)
            .end()
            .end()
            .end();
        w.literal("owner", "$owner");
        w.bool("upsert", true);
        let expected = rawdoc! {
            "q": { "_id": "k\u{0}ey $ é" },
            "u": [{ "c": constant.clone(), "list": ["$$ROOT", {}, -5_i64, false] }],
            "owner": { "$literal": "$owner" },
            "upsert": true,
        };
        assert_eq!(w.finish().as_bytes(), expected.as_bytes());
    }

    #[test]
    fn arrays_of_more_than_ten_elements_get_two_digit_keys() {
        let mut w = Writer::with_capacity(16);
        w.array("a");
        for i in 0..12_i64 {
            w.i64("", i);
        }
        w.end();
        let expected = rawdoc! { "a": [0_i64, 1_i64, 2_i64, 3_i64, 4_i64, 5_i64, 6_i64, 7_i64, 8_i64, 9_i64, 10_i64, 11_i64] };
        assert_eq!(w.finish().as_bytes(), expected.as_bytes());
    }

    #[test]
    #[should_panic(expected = "left open")]
    fn a_document_left_open_is_a_bug_not_bad_bson() {
        let mut w = Writer::with_capacity(16);
        w.doc("open");
        let _ = w.finish();
    }
}
