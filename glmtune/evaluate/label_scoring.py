"""Score every label's answer after a prompt in one forward pass, reusing a shared prompt prefix.

The answers of all labels form a trie (``意图：`` is shared by all 34 CMCC answers, so it is
computed once). A batch row is ``[dialogue suffix | padding | trie nodes]``:

* the common prefix of every prompt (template prefix + long system prompt) is run once and its
  key/value cache is reused by every batch;
* each trie node attends to the prompt and to its own ancestors only (a 4D mask), at position
  ``prompt length + depth``, so one forward gives ``log p(token | prompt, path)`` for every node;
* the LM head runs only where a next token is predicted (the vocabulary has 151k entries).

With ``decisive=True`` each answer is scored only up to the token that sets it apart from every
other answer (``意图：7``); the rest (``：办理开通`` + end token) is forced once the label is chosen.
That cuts the 34 CMCC answers from ~240 trie nodes to 36, and changes no prediction.

From the node log-probabilities come two things: each label's log-likelihood (softmax over labels =
the reported probabilities) and the trie-greedy path, which is exactly what greedy decoding
restricted to valid answers produces. Whenever unrestricted greedy generation yields a valid answer,
each of its tokens is the argmax over the whole vocabulary and therefore over the trie's children,
so the trie-greedy prediction agrees with it by construction.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Sequence

from glmtune.errors import InputError


@dataclass
class LabelTrie:
    """Nodes in creation order (a parent always precedes its children)."""
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)      # -1 = child of the prompt
    depths: list[int] = field(default_factory=list)
    children: dict[int, dict[int, int]] = field(default_factory=dict)  # node (-1 root) -> token -> node
    leaf_of_label: list[int] = field(default_factory=list)
    path_of_label: list[list[int]] = field(default_factory=list)

    @classmethod
    def build(cls, answers: Sequence[Sequence[int]], decisive: bool = False) -> "LabelTrie":
        """``decisive``: cut each answer after its first token no other answer shares there (for
        ``意图：7：办理开通`` the ``7``); the rest is forced once the label is decided, so scoring it
        changes neither the greedy choice nor the restricted decoder's choice, and costs ~6x the tokens."""
        trie = cls(children={-1: {}})
        for k, ids in enumerate(answers):
            if not ids:
                raise InputError(f"label {k} has an empty answer", fix="give every label an answer text")
        if decisive:
            answers = [_decisive_prefix(ids, answers) for ids in answers]
        for k, ids in enumerate(answers):
            node, path = -1, []
            for tok in ids:
                nxt = trie.children[node].get(tok)
                if nxt is None:
                    nxt = len(trie.tokens)
                    trie.tokens.append(int(tok))
                    trie.parents.append(node)
                    trie.depths.append(0 if node == -1 else trie.depths[node] + 1)
                    trie.children[node][tok] = nxt
                    trie.children[nxt] = {}
                node = nxt
                path.append(node)
            trie.leaf_of_label.append(node)
            trie.path_of_label.append(path)
        for k, leaf in enumerate(trie.leaf_of_label):
            if trie.children[leaf]:
                raise InputError(f"label {k}'s answer ids are a prefix of another label's",
                                 fix="answers must end with the template's end token (use its encode)")
        return trie

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def inner(self) -> list[int]:
        """Nodes with children: where a next-token distribution is needed."""
        return [n for n in range(len(self)) if self.children[n]]

    def greedy_label(self, node_logprob) -> int:
        """Follow the most likely child from the root to a leaf; ``node_logprob[n]`` scores node n."""
        node = -1
        while self.children[node]:
            node = max(self.children[node].values(), key=lambda n: float(node_logprob[n]))
        return self.leaf_of_label.index(node)


def _decisive_prefix(ids: Sequence[int], answers: Sequence[Sequence[int]]) -> list[int]:
    """The shortest prefix of ``ids`` that no other answer starts with."""
    others = [a for a in answers if list(a) != list(ids)]
    for n in range(1, len(ids) + 1):
        if not any(list(a[:n]) == list(ids[:n]) for a in others):
            return list(ids[:n])
    return list(ids)


def common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix, leaving at least one token of every prompt."""
    if not prompts:
        return 0
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


class LabelScorer:
    """Scores label answers after prompts with a model (a transformers causal LM, peft or not)."""

    def __init__(self, model, device, answers: Sequence[Sequence[int]], pad_id: int,
                 shared_prefix: Sequence[int] = (), decisive: bool = False, head_chunk: int = 4096):
        import torch
        self.device, self.pad_id, self.head_chunk = device, pad_id, head_chunk
        self.trie = trie = LabelTrie.build(answers, decisive=decisive)
        self.decoder = _decoder_of(model)
        self._cache_key = _cache_keyword(self.decoder)
        self.head = model.get_output_embeddings()
        self.prefix = list(shared_prefix)
        self.prefix_cache = self._run_prefix() if self.prefix else None
        # Per-trie constants, built once: the scoring loop only indexes them.
        self._tokens = torch.tensor(trie.tokens, dtype=torch.long)
        self._tokens_dev = self._tokens.to(device)
        self._depths = torch.tensor(trie.depths, dtype=torch.long)
        self._ancestors = _ancestor_matrix(trie).to(device)
        inner = trie.inner
        self._inner = torch.tensor(inner, dtype=torch.long, device=device)
        slot = {-1: 0, **{n: j + 1 for j, n in enumerate(inner)}}  # where each parent's logits sit
        self._parent_slot = torch.tensor([slot[p] for p in trie.parents], device=device)
        on_path = torch.zeros((len(trie), len(trie.path_of_label)), device=device)
        for k, path in enumerate(trie.path_of_label):
            on_path[path, k] = 1.0
        self._on_path = on_path  # (nodes, labels): a label's log-likelihood = its nodes' sum

    def _run_prefix(self):
        import torch
        ids = torch.tensor([self.prefix], device=self.device)
        return getattr(self.decoder(input_ids=ids, use_cache=True), self._cache_key)

    def score(self, prompts: Sequence[Sequence[int]]):
        """(node log-probs (B, nodes), label log-likelihoods (B, labels)) for prompts that all start
        with the shared prefix."""
        import torch
        P = len(self.prefix)
        suffixes = [list(p[P:]) for p in prompts]
        if any(list(p[:P]) != self.prefix for p in prompts) or any(not s for s in suffixes):
            raise ValueError("every prompt must extend the shared prefix by at least one token")
        B, S, T = len(prompts), max(len(s) for s in suffixes), len(self.trie)
        n = torch.tensor([len(s) for s in suffixes])
        ids = torch.full((B, S + T), self.pad_id, dtype=torch.long)
        for i, suf in enumerate(suffixes):
            ids[i, :len(suf)] = torch.tensor(suf)
        ids[:, S:] = self._tokens
        ar = torch.arange(S)
        pos = torch.cat([P + torch.minimum(ar[None, :], n[:, None] - 1), P + n[:, None] + self._depths[None, :]], 1)
        mask = self._mask(n.to(self.device), S, T, P)
        cache = None
        if self.prefix_cache is not None:
            cache = copy.deepcopy(self.prefix_cache)
            cache.batch_repeat_interleave(B)
        hidden = self.decoder(input_ids=ids.to(self.device), position_ids=pos.to(self.device),
                              attention_mask=mask, use_cache=cache is not None,
                              **{self._cache_key: cache}).last_hidden_state
        return self._node_logprobs(hidden, n.to(self.device), S)

    def _mask(self, n, S: int, T: int, P: int):
        """(B, 1, S+T, P+S+T) additive mask: dialogue causal within its length, padding sees itself,
        trie nodes see the dialogue and their ancestors; everything sees the shared prefix."""
        import torch
        L, dev = S + T, self.device
        q = torch.arange(L, device=dev)[None, :, None]
        k = torch.arange(L, device=dev)[None, None, :]
        nb = n[:, None, None]
        in_dialogue = (q < S) & (k < S) & (((k <= q) & (q < nb)) | ((q >= nb) & (k == q)))
        trie_sees_dialogue = (q >= S) & (k < nb)
        allowed = in_dialogue | trie_sees_dialogue
        allowed[:, S:, S:] |= self._ancestors
        allowed = torch.cat([torch.ones((len(n), L, P), dtype=torch.bool, device=dev), allowed], 2)
        dtype = self.head.weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=dev)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    def _node_logprobs(self, hidden, n, S: int):
        import torch
        B = hidden.shape[0]
        where = torch.cat([(n - 1)[:, None], (S + self._inner)[None, :].expand(B, -1)], 1)
        picked = hidden.gather(1, where[:, :, None].expand(-1, -1, hidden.shape[-1]))  # (B, W, H)
        W = where.shape[1]
        rows = max(1, self.head_chunk // W)  # (rows*W, vocab) logits at a time: the vocab is 151k
        node_lp = []
        for start in range(0, B, rows):
            logp = torch.log_softmax(self.head(picked[start:start + rows]).float(), dim=-1)  # (r, W, V)
            node_lp.append(logp[:, self._parent_slot, self._tokens_dev])
        node_lp = torch.cat(node_lp)
        label_lp = node_lp @ self._on_path
        return node_lp.cpu(), label_lp.cpu()


def _ancestor_matrix(trie: LabelTrie):
    """(T, T) bool: node attends to node (itself and its ancestors)."""
    import torch
    T = len(trie)
    anc = torch.zeros((T, T), dtype=torch.bool)
    for node in range(T):
        m = node
        while m != -1:
            anc[node, m] = True
            m = trie.parents[m]
    return anc


def _cache_keyword(decoder) -> str:
    """The name of the key/value cache in the decoder's forward and in its output: transformers
    5.24 renamed `past_key_values` to `cache` (the old name warns and is due to go)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _decoder_of(model):
    """The transformer body (no LM head) of a causal LM, through a peft wrapper if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    if decoder is None:
        raise InputError(f"cannot find the decoder of {type(base).__name__}",
                         fix="use --mode generate for this architecture")
    return decoder
