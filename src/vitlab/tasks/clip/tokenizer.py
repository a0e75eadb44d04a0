"""CLIP's byte-level BPE tokenizer on the ``tokenizers`` library.

Loads a Hugging Face CLIP tokenizer folder (``tokenizer.json``, or ``vocab.json`` +
``merges.txt``) or trains a small BPE on a caption corpus; saves next to a checkpoint.
Sequences are ``[start] tokens [end]``, truncated to the context length with the last id
forced to end-of-text and right-padded, as OpenAI's ``clip.tokenize`` does.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
#: CLIP's pre-tokenizer pattern (words, single digits, punctuation runs, contractions).
SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CONFIG_NAME = "vitlab_tokenizer.json"


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("CLIP tokenizers need the 'tokenizers' package: pip install 'vitlab[clip]'") from e
    return tokenizers


def _clip_pipeline(model: Any) -> Any:
    """A ``tokenizers.Tokenizer`` around a BPE ``model`` with CLIP's normaliser, splitting and decoder."""
    tk = _tokenizers()
    tok = tk.Tokenizer(model)
    tok.normalizer = tk.normalizers.Sequence(
        [tk.normalizers.NFC(), tk.normalizers.Replace(tk.Regex(r"\s+"), " "), tk.normalizers.Lowercase()]
    )
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = tk.decoders.ByteLevel()
    return tok


class CLIPTokenizer:
    """Text -> (B, context_length) token ids, CLIP style.

    Args:
        tokenizer: A ``tokenizers.Tokenizer`` with CLIP's pipeline (no post-processor needed).
        context_length: Length of every returned sequence.
        bos_token: Start-of-text token.
        eos_token: End-of-text token.
        pad_id: Id used for padding; the end-of-text id when None (Hugging Face's default).
    """

    def __init__(self, tokenizer: Any, context_length: int = 77, bos_token: str = BOS, eos_token: str = EOS,
                 pad_id: int | None = None) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.bos_token, self.eos_token = bos_token, eos_token
        ids = [tokenizer.token_to_id(t) for t in (bos_token, eos_token)]
        if None in ids:
            raise ValueError(f"the vocabulary lacks the special tokens {bos_token!r} / {eos_token!r}")
        self.bos_id, self.eos_id = int(ids[0]), int(ids[1])
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids (including special tokens)."""
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    # -------------------------------------------------------------- building
    @classmethod
    def from_vocab(cls, vocab: dict[str, int], merges: Sequence[tuple[str, str]], **kwargs: Any) -> CLIPTokenizer:
        """From a CLIP vocabulary (token -> id, words end in ``</w>``) and its merge list."""
        tk = _tokenizers()
        bpe = tk.models.BPE(vocab=dict(vocab), merges=[tuple(m) for m in merges], continuing_subword_prefix="",
                            end_of_word_suffix="</w>", unk_token=EOS, fuse_unk=False)
        return cls(_clip_pipeline(bpe), **kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | Path, context_length: int | None = None, **kwargs: Any) -> CLIPTokenizer:
        """Load from a Hugging Face CLIP folder or a folder written by :meth:`save`.

        Reads ``tokenizer.json`` when present, else ``vocab.json`` + ``merges.txt``.

        Raises:
            FileNotFoundError: When the folder holds neither.
        """
        folder = Path(folder)
        settings: dict[str, Any] = {}
        if (folder / CONFIG_NAME).is_file():
            settings = json.loads((folder / CONFIG_NAME).read_text())
        if context_length is not None:
            settings["context_length"] = context_length
        settings.update(kwargs)
        if (folder / "tokenizer.json").is_file():
            tok = _tokenizers().Tokenizer.from_file(str(folder / "tokenizer.json"))
            return cls(tok, **settings)
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        if not (vocab_file.is_file() and merges_file.is_file()):
            raise FileNotFoundError(f"{folder} holds no CLIP tokenizer: expected tokenizer.json or vocab.json + merges.txt")
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        lines = merges_file.read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        return cls.from_vocab(vocab, merges, **settings)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 1, context_length: int = 77
              ) -> CLIPTokenizer:
        """Train a byte-level BPE with CLIP's pipeline on a caption corpus.

        As in CLIP's vocabulary, every byte symbol and its word-final ``</w>`` form is a
        token (any text can be encoded), followed by the learned merges and the special
        tokens, which get the two largest ids so CLIP's argmax pooling finds end-of-text.
        ``vocab_size`` counts the learned tokens on top of the 512 byte symbols.
        """
        tk = _tokenizers()
        bpe = tk.models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=EOS, fuse_unk=False)
        tok = _clip_pipeline(bpe)
        alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
        trainer = tk.trainers.BpeTrainer(vocab_size=len(alphabet) * 2 + vocab_size, min_frequency=min_frequency,
                                         initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        with tempfile.TemporaryDirectory() as tmp:
            vocab_file, merges_file = tok.model.save(tmp)
            learned = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
            merges = [tuple(line.split()) for line in Path(merges_file).read_text(encoding="utf-8").splitlines()
                      if line.strip() and not line.startswith("#version")]
        base = sorted(alphabet)
        order = base + [c + "</w>" for c in base] + sorted(learned, key=learned.__getitem__) + [BOS, EOS]
        vocab = {t: i for i, t in enumerate(dict.fromkeys(order))}
        return cls.from_vocab(vocab, merges, context_length=context_length)

    # -------------------------------------------------------------- encoding
    def encode_ids(self, text: str) -> list[int]:
        """``[start] tokens [end]`` of one text, neither truncated nor padded."""
        return [self.bos_id, *self.tokenizer.encode(text, add_special_tokens=False).ids, self.eos_id]

    def __call__(self, texts: str | Sequence[str], truncate: bool = True) -> Tensor:
        """Texts -> token ids (B, context_length), right-padded with ``pad_id``.

        Args:
            texts: One text or a list.
            truncate: Cut long texts to the context length (last id set to end-of-text);
                when False a long text raises ValueError.
        """
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.encode_ids(text)
            if len(ids) > self.context_length:
                if not truncate:
                    raise ValueError(f"text {i} has {len(ids)} tokens, more than the context length {self.context_length}")
                ids = ids[: self.context_length]
                ids[-1] = self.eos_id
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Token ids -> text, without the special tokens and the padding."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids[1:]:
            ids = ids[: ids.index(self.eos_id, 1)]
        text = self.tokenizer.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])
        return " ".join(text.replace("</w>", " ").split())  # word ends -> single spaces

    # ---------------------------------------------------------------- saving
    def to_dict(self) -> dict[str, Any]:
        """The whole tokenizer as plain values (its ``tokenizer.json`` text and the CLIP settings),
        e.g. to travel inside a checkpoint's metadata; :meth:`from_dict` reads it back."""
        return dict(tokenizer_json=self.tokenizer.to_str(), context_length=self.context_length,
                    bos_token=self.bos_token, eos_token=self.eos_token, pad_id=self.pad_id)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CLIPTokenizer:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: When ``values`` is not what :meth:`to_dict` writes.
        """
        if not isinstance(values, dict) or "tokenizer_json" not in values:
            raise ValueError("not a saved CLIP tokenizer: expected the keys tokenizer_json and context_length")
        settings = {k: v for k, v in values.items() if k != "tokenizer_json"}
        return cls(_tokenizers().Tokenizer.from_str(values["tokenizer_json"]), **settings)

    def save(self, folder: str | Path) -> None:
        """Write ``tokenizer.json`` and the CLIP settings (context length, padding) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        settings = dict(context_length=self.context_length, bos_token=self.bos_token, eos_token=self.eos_token,
                        pad_id=self.pad_id)
        (folder / CONFIG_NAME).write_text(json.dumps(settings, indent=2))
