"""Tokenized WebDataset shards and a packed, elastic, exactly resumable loader.

Entry points: `python -m data_pipeline.prepare` (raw text -> shards + manifest),
`python -m data_pipeline.demo_corpus` (stdlib corpus, no network), `data_pipeline.loader`
(`build_train_loader`, `build_val_loader`), `data_pipeline.tokenizer.load_tokenizer`,
`data_pipeline.manifest.read_manifest`, `data_pipeline.streams.global_row_indices`.
"""
