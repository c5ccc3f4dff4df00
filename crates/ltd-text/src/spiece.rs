//! A reader for SentencePiece's `spiece.model`: the serialised `ModelProto` of
//! `sentencepiece_model.proto`, of which we need only what transformers' `SentencePieceExtractor`
//! takes for a unigram tokenizer: the pieces (string, score, type), the trainer's model type
//! and the normaliser's precompiled character map.
//!
//! The protobuf wire format is small enough to read by hand: a message is a sequence of
//! `(field number << 3 | wire type)` varint keys, each followed by a varint (type 0), eight
//! bytes (1), a varint length and that many bytes (2: strings, bytes, sub-messages) or four
//! bytes (5: `float`). Fields we do not need are skipped by their wire type, so newer fields
//! in the file do no harm. The fields read (`sentencepiece_model.proto`):
//!
//! ```text
//! ModelProto      { repeated SentencePiece pieces = 1; TrainerSpec trainer_spec = 2;
//!                   NormalizerSpec normalizer_spec = 3; … }
//! SentencePiece   { string piece = 1; float score = 2; Type type = 3 [default = NORMAL]; }
//! TrainerSpec     { ModelType model_type = 3 [default = UNIGRAM]; … }
//! NormalizerSpec  { string name = 1; bytes precompiled_charsmap = 2; … }
//! ```

use std::path::Path;

use ltd_nn::{Error, Result};

/// `SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// An ordinary piece (1, the default).
    Normal,
    /// `<unk>` (2).
    Unknown,
    /// A control symbol such as `</s>` or `<pad>` (3): never produced from text.
    Control,
    /// A user-defined symbol (4), matched as a whole in the text.
    UserDefined,
    /// A byte-fallback piece `<0x..>` (6).
    Byte,
    /// An unused piece (5).
    Unused,
}

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The piece's text (`▁` for spaces).
    pub piece: String,
    /// Its unigram log-probability.
    pub score: f32,
    /// What kind of piece it is.
    pub kind: PieceType,
}

/// The parts of a `ModelProto` a unigram tokenizer is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePieceModel {
    /// The vocabulary, in id order.
    pub pieces: Vec<Piece>,
    /// `TrainerSpec.model_type`: 1 unigram (the default), 2 BPE, 3 word, 4 char.
    pub model_type: u64,
    /// `NormalizerSpec.precompiled_charsmap`, when the model has a normalisation table.
    pub precompiled_charsmap: Option<Vec<u8>>,
}

/// `TrainerSpec.ModelType.UNIGRAM`.
pub const UNIGRAM: u64 = 1;

impl SentencePieceModel {
    /// Reads `path`; errors name the file and what is wrong with it.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
        Self::parse(&bytes).map_err(|message| {
            Error::msg(format!("{}: not a SentencePiece model: {message}", path.display()))
        })
    }

    /// Parses a serialised `ModelProto`.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut model =
            Self { pieces: Vec::new(), model_type: UNIGRAM, precompiled_charsmap: None };
        let mut r = Reader::new(bytes);
        while let Some((field, value)) = r.field()? {
            match (field, value) {
                (1, Value::Bytes(b)) => model.pieces.push(piece(b, model.pieces.len())?),
                (2, Value::Bytes(b)) => {
                    let mut t = Reader::new(b);
                    while let Some((f, v)) = t.field()? {
                        if let (3, Value::Varint(v)) = (f, v) {
                            model.model_type = v;
                        }
                    }
                }
                (3, Value::Bytes(b)) => {
                    let mut n = Reader::new(b);
                    while let Some((f, v)) = n.field()? {
                        if let (2, Value::Bytes(map)) = (f, v) {
                            model.precompiled_charsmap = (!map.is_empty()).then(|| map.to_vec());
                        }
                    }
                }
                (1..=3, _) => return Err(format!("field {field} has the wrong wire type")),
                _ => {}
            }
        }
        if model.pieces.is_empty() {
            return Err("it has no pieces".into());
        }
        Ok(model)
    }
}

fn piece(bytes: &[u8], index: usize) -> std::result::Result<Piece, String> {
    let mut p = Piece { piece: String::new(), score: 0.0, kind: PieceType::Normal };
    let mut r = Reader::new(bytes);
    while let Some((field, value)) = r.field()? {
        match (field, value) {
            (1, Value::Bytes(b)) => {
                p.piece = String::from_utf8(b.to_vec())
                    .map_err(|_| format!("piece {index} is not UTF-8"))?;
            }
            (2, Value::Fixed32(bits)) => p.score = f32::from_bits(bits),
            (3, Value::Varint(t)) => {
                p.kind = match t {
                    1 => PieceType::Normal,
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    other => return Err(format!("piece {index} has unknown type {other}")),
                }
            }
            (1..=3, _) => {
                return Err(format!("piece {index}: field {field} has the wrong wire type"))
            }
            _ => {}
        }
    }
    Ok(p)
}

/// A field's payload, by wire type.
enum Value<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let &b = self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            format!("a field of {n} bytes runs past the end ({} left)", self.buf.len() - self.pos)
        })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// The next `(field number, value)`, or `None` at the end of the message.
    fn field(&mut self) -> std::result::Result<Option<(u64, Value<'a>)>, String> {
        if self.pos == self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| "length overflows")?;
                Value::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            w => return Err(format!("unsupported wire type {w} (field {})", key >> 3)),
        };
        Ok(Some((key >> 3, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-encoded ModelProto: two pieces (one with an explicit type), a trainer spec with
    /// an unknown varint field before model_type, a normaliser spec with a name and a map, and
    /// an unknown fixed64 field at the end.
    #[test]
    fn reads_pieces_model_type_and_charsmap() {
        let piece = |s: &str, score: f32, kind: Option<u8>| {
            let mut m = vec![0x0a, s.len() as u8];
            m.extend_from_slice(s.as_bytes());
            m.push(0x15);
            m.extend_from_slice(&score.to_le_bytes());
            if let Some(k) = kind {
                m.extend_from_slice(&[0x18, k]);
            }
            let mut out = vec![0x0a, m.len() as u8];
            out.extend(m);
            out
        };
        let mut bytes = piece("<pad>", 0.0, Some(3));
        bytes.extend(piece("▁a", -1.5, None));
        bytes.extend([0x12, 0x05, 0xa8, 0x02, 0x07, 0x18, 0x01]); // trainer: field 37 = 7, model_type 1
        bytes.extend([0x1a, 0x07, 0x0a, 0x01, b'n', 0x12, 0x02, 0xaa, 0xbb]);
        bytes.extend([0x21, 1, 2, 3, 4, 5, 6, 7, 8]); // field 4, fixed64
        let m = SentencePieceModel::parse(&bytes).unwrap();
        assert_eq!(m.pieces.len(), 2);
        assert_eq!((m.pieces[0].piece.as_str(), m.pieces[0].kind), ("<pad>", PieceType::Control));
        assert_eq!(
            (m.pieces[1].piece.as_str(), m.pieces[1].score, m.pieces[1].kind),
            ("▁a", -1.5, PieceType::Normal)
        );
        assert_eq!(m.model_type, UNIGRAM);
        assert_eq!(m.precompiled_charsmap.as_deref(), Some(&[0xaa, 0xbb][..]));
    }

    #[test]
    fn broken_input_is_an_error() {
        assert!(SentencePieceModel::parse(&[]).unwrap_err().contains("no pieces"));
        assert!(SentencePieceModel::parse(&[0x0a, 0x09, 0x0a])
            .unwrap_err()
            .contains("past the end"));
        assert!(SentencePieceModel::parse(&[0x0b]).unwrap_err().contains("wire type 3"));
        assert!(SentencePieceModel::parse(&[0x08, 0x80]).unwrap_err().contains("truncated varint"));
        assert!(SentencePieceModel::parse(b"{\"not\": \"protobuf\"}").is_err());
    }
}
