"""Data the user does not have yet, written by an LLM: grounded QA pairs from pages (synthesize) and
paraphrases of rare classes (augment). Above infer: it runs the LLM clients of glmtune.infer.llm."""
