"""Writes the T5 tokenizer of the shapes-t5 recipe: a SentencePiece unigram model whose pieces
are the words of make-shapes captions, in the layout of t5-v1_1 / DeepFloyd IF repos
(`spiece.model` plus `tokenizer_config.json`), which both transformers' `T5Tokenizer` and ltd
load.

    /work/venv-ref/bin/python configs/train/shapes-t5/make_tokenizer.py

SentencePiece's unigram trainer, on a corpus this small (every caption make-shapes can
write), stops at 45 pieces and splits most words into letters whatever vocab_size asks for.
So the trainer only provides the model's frame (trainer and normaliser specs, special
pieces), and the vocabulary is set here: one `▁word` piece per caption word, scored by its
log frequency in that corpus, and every letter alone (scored far lower) so that any other
lower-case word still tokenizes. The normaliser is the identity (captions are plain lower-case
ASCII; T5's own nmt_nfkc table alone would be 240 KB). Deterministic: no randomness, fixed
order. T5's special tokens: <pad> = 0, </s> = 1, <unk> = 2, no
<s>. `model_max_length` is 77, CLIP's context length, so that the U-Net attends over as many
text positions as the CLIP-conditioned model does; no sentinel (<extra_id_n>) tokens, which
only T5's span-corruption pre-training uses.

Keep the word lists in step with crates/ltd-train/src/shapes.rs.
"""

import io
import math
import json
from itertools import product
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

OUT = Path(__file__).resolve().parent / "tokenizer"
MODEL_MAX_LENGTH = 77

SIZES = ["small", "large"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]
BACKGROUNDS = ["white", "black", "gray", "blue"]
POSITIONS = [
    "in the top left", "at the top", "in the top right",
    "on the left", "in the center", "on the right",
    "in the bottom left", "at the bottom", "in the bottom right",
]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def captions() -> list[str]:
    out = []
    for size, colour, shape, pos, bg in product(SIZES + [None], COLOURS, SHAPES, POSITIONS + [None], BACKGROUNDS):
        words = ([size] if size else []) + [colour, shape] + ([pos] if pos else [])
        out.append(f"{article(words[0])} {' '.join(words)} on {article(bg)} {bg} background")
    return out


def word_pieces(trained: bytes) -> bytes:
    """The trained model with its normal pieces replaced by the caption words and letters."""
    proto = pb.ModelProto()
    proto.ParseFromString(trained)
    special = [p for p in proto.pieces if p.type != pb.ModelProto.SentencePiece.NORMAL]
    assert [p.piece for p in special] == ["<pad>", "</s>", "<unk>"], [p.piece for p in special]
    counts: dict[str, int] = {}
    for c in captions():
        for w in c.split():
            counts[w] = counts.get(w, 0) + 1
    total = sum(counts.values())
    words = sorted(counts, key=lambda w: (-counts[w], w))
    letters = sorted({ch for w in words for ch in w})
    del proto.pieces[:]
    proto.pieces.extend(special)
    for w in words:
        proto.pieces.add(piece="\u2581" + w, score=math.log(counts[w] / total), type=pb.ModelProto.SentencePiece.NORMAL)
    proto.pieces.add(piece="\u2581", score=-50.0, type=pb.ModelProto.SentencePiece.NORMAL)
    for ch in letters:
        proto.pieces.add(piece=ch, score=-50.0, type=pb.ModelProto.SentencePiece.NORMAL)
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto.SerializeToString()


def main() -> None:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions()),
        model_writer=buf,
        vocab_size=64,
        hard_vocab_limit=False,
        model_type="unigram",
        normalization_rule_name="identity",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        character_coverage=1.0,
        minloglevel=2,
    )
    model = word_pieces(buf.getvalue())
    OUT.mkdir(exist_ok=True)
    (OUT / "spiece.model").write_bytes(model)
    config = {
        "eos_token": "</s>",
        "extra_ids": 0,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<pad>",
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    sp = spm.SentencePieceProcessor(model_proto=model)
    words = sorted({w for c in captions() for w in c.split()})
    split = {w: sp.encode(w, out_type=str) for w in words}
    print(f"{sp.get_piece_size()} pieces; words split into several pieces:",
          {w: p for w, p in split.items() if len(p) > 1} or "none")


if __name__ == "__main__":
    main()
