"""A synthetic ChatGLM2/3 tokenizer folder, trained in seconds with the sentencepiece trainer.

The real ChatGLM2/3 ``tokenizer.model`` may be used but not redistributed, so a fresh clone has none.
This one has the structure glmtune's loader relies on, copied from the real file's trainer and
normaliser specs: a BPE model, ``<unk>``=0 ``<s>``=1 ``</s>``=2, the 256 byte-fallback pieces,
identity normalisation, a dummy prefix, whitespace kept as it is (whitespace-only pieces allowed),
and the same ``tokenizer_config.json`` (its ``name_or_path`` tells ChatGLM2 from ChatGLM3). Only the
vocabulary is small, so the special ids (appended after the pieces: ChatGLM2 [MASK] [gMASK] [sMASK]
sop eop, ChatGLM3 also <|system|> <|user|> <|assistant|> <|observation|>) are ``len(pieces) + k``,
not 64789 + k: tests read them from the tokenizer. Characters the corpus lacks (most emoji, rare
hanzi) go through byte fallback, as rare characters do in the real model.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

# A small bilingual corpus: the kinds of text the template tests encode (chat turns, digits, code,
# punctuation of both languages, runs of spaces and newlines), repeated so BPE finds merges.
CORPUS = """你好，世界。我是一个人工智能助手，很高兴为你服务。
你是一个乐于助人的助手。请用一句话介绍一下长城，以及它为什么有名？
长城是中国古代的防御工程。北京的天气怎么样？北京今天晴，气温 25 度。明天呢？
你好，我想查话费。好的，请提供您的手机号。您的余额是 25 元。谢谢！不客气！
查余额，余额 25 元。上海天气？上海现在 30 度。查询城市天气，你是天气助手。
客户说：我想办业务。不要了。开通，取消，投诉。答案是什么？第一个问题是什么？
ChatGLM3 是一个对话模型，简洁回答。再加三呢？好的。表情和数字 12345。
Hello, world! Hi there, how can I help? Thanks! And the Forbidden City?
Answer the following questions as best as you can. You have access to the following tools:
The quick brown fox jumps over the lazy dog. Multi line text with 'quotes' and "double quotes".
I'm fine, don't worry; we'll see what they've done. What is 2+2? It is 4, of course. 1+1 = 2.
def get_weather(city): return {"city": city, "temp": 30}  # tool_call(phone='138')
```python
print("hello")
```
  leading and  double  spaces,	tabs	and
line1
line2

- a
- b
"""


def train_sentencepiece(vocab_size: int = 1000) -> bytes:
    """The model file's bytes; one thread and no shuffling, so the same corpus gives the same bytes."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 20), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    return model.getvalue()


def write_chatglm_tokenizer(out_dir: Path, family: str, model_bytes: bytes) -> Path:
    """A tokenizer folder shaped like THUDM/chatglm2-6b's or chatglm3-6b's download."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model_bytes)
    config = {"name_or_path": f"THUDM/{family}-6b", "remove_space": False, "do_lower_case": False,
              "tokenizer_class": "ChatGLMTokenizer",
              "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir
