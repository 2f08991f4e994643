"""Data stage: raw files -> canonical chat records (docs/ARCHITECTURE.md) -> clean/dedupe/split/stats.

readers.read_records (formats.py registry: formats_chat, formats_table), records.validate_record,
clean.clean_records, dedupe.dedupe_records, split.split_records, registry.load_dataset,
stats.compute_stats, cutoff.fit_records (the overflow policy training uses), render.render_record,
sample.sample_path;
pipeline.* holds one function per `glmtune data` command. Modules import lazily (no torch here).
"""
