"""Built-in table formats: generic CSV classification (text/label columns) and CMCC-34."""
from __future__ import annotations

from glmtune.data.cmcc import CMCC_INTENTS, cmcc_answer, cmcc_system_prompt, dialogue_text
from glmtune.data.formats import RowContext, register_format


def _cell(row: dict, col: str, ctx: RowContext) -> str:
    value = ctx.require(row, col)
    if not value.strip():
        raise ctx.error(f"empty value in column '{col}'", field=col)
    return value.strip()


def _mapped_label(raw: str, col: str, ctx: RowContext) -> str:
    label_map = ctx.options.get("label_map")
    if label_map is None:
        return raw
    if raw not in label_map:
        known = ", ".join(sorted(set(label_map.values()))[:10])
        raise ctx.error(f"label {raw!r} is not in the label map", field=col,
                        fix=f"add it to the label map (known: {known}...)")
    return label_map[raw]


@register_format("classification", detect=(("text", "label"),), container="csv",
                 description="CSV text/label columns -> user text, assistant answers the label name")
def classification_record(row: dict, ctx: RowContext) -> dict:
    """CSV classification: --text-col is the user turn; --label-col (mapped by --label-map) the answer."""
    text_col = ctx.options.get("text_col") or "text"
    label_col = ctx.options.get("label_col") or "label"
    response_col = ctx.options.get("response_col")
    messages = [{"role": "user", "content": _cell(row, text_col, ctx)}]
    record: dict = {}
    if label_col in row or not response_col:
        label = _mapped_label(_cell(row, label_col, ctx), label_col, ctx)
        record["label"] = label
    answer = _cell(row, response_col, ctx) if response_col else record["label"]
    messages.append({"role": "assistant", "content": answer})
    if ctx.options.get("system"):
        messages.insert(0, {"role": "system", "content": ctx.options["system"]})
    return {"messages": messages, **record}


def _intent_id(row: dict, ctx: RowContext) -> int:
    raw = _cell(row, "c_numerical", ctx)
    try:
        intent_id = int(float(raw))  # pandas writes ids as "7.0" when a column had blanks
    except ValueError:
        raise ctx.error(f"c_numerical must be an integer 0-33, got {raw!r}", field="c_numerical") from None
    if intent_id not in CMCC_INTENTS:
        raise ctx.error(f"c_numerical {intent_id} is not a CMCC-34 intent id (0-33)", field="c_numerical")
    name = (row.get("label_raw") or "").strip()
    if name and name != CMCC_INTENTS[intent_id]:
        raise ctx.error(f"label_raw {name!r} does not match intent {intent_id} "
                        f"({CMCC_INTENTS[intent_id]!r})", field="label_raw",
                        fix="the id and the name disagree; correct one of them")
    return intent_id


@register_format("cmcc", detect=(("sentence_sep", "c_numerical"),), container="csv")
def cmcc_record(row: dict, ctx: RowContext) -> dict:
    """CMCC-34 CSV -> the intent classification prompt (system lists 34 intents; answer 意图：{id}：{name})."""
    text_col = ctx.options.get("text_col") or "sentence_sep"
    dialogue = dialogue_text(_cell(row, text_col, ctx), ctx.options.get("turn_joiner", "\n"))
    if not dialogue:
        raise ctx.error("dialogue has no non-empty turns", field=text_col)
    intent_id = _intent_id(row, ctx)
    messages = [{"role": "system", "content": ctx.options.get("system") or cmcc_system_prompt()},
                {"role": "user", "content": dialogue},
                {"role": "assistant", "content": cmcc_answer(intent_id)}]
    return {"messages": messages, "label": intent_id, "meta": {"label_name": CMCC_INTENTS[intent_id]}}
