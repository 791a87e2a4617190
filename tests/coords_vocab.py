"""A small synthetic coords tokenizer file (the official one is on the HF hub, unreachable here).

Same shape as TerraMind's: a WordPiece tokenizer with BERT normaliser and pre-tokenizer, the
special tokens [PAD] [UNK] [SOS] [EOS] [S_0] [S_1] [S_2] at ids 0-6, and one added token per
grid value ("lat=47.25", "lon=-8.50"), so that a coordinate is one token. ``step`` coarsens the
grid to keep the file small; values off that grid tokenise to [UNK] pieces, as they would with
any vocabulary that lacks them. Upstream's formatting writes small negative values that snap to
zero as "-0.00", so those spellings are in the vocabulary too.
"""
from __future__ import annotations

from pathlib import Path

SPECIAL = ("[PAD]", "[UNK]", "[SOS]", "[EOS]", "[S_0]", "[S_1]", "[S_2]")


def write_coords_tokenizer(path: Path, step: float = 0.25) -> Path:
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.decoders import WordPiece as WordPieceDecoder
    from tokenizers.models import WordPiece
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    vocab = {token: i for i, token in enumerate(SPECIAL)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = BertNormalizer()
    tok.pre_tokenizer = BertPreTokenizer()
    tok.decoder = WordPieceDecoder()
    tok.add_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL])
    per_degree = round(1 / step)
    lats = [f"lat={i / per_degree:.2f}" for i in range(-90 * per_degree, 90 * per_degree + 1)]
    lons = [f"lon={i / per_degree:.2f}" for i in range(-180 * per_degree, 180 * per_degree + 1)]
    tok.add_tokens([AddedToken(t, normalized=False) for t in lats + lons + ["lat=-0.00", "lon=-0.00"]])
    path = Path(path)
    tok.save(str(path))
    return path
