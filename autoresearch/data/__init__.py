"""The data pipeline: from a source (climbmix, tinystories, stdlib, files:PATH) to a prepared
dataset in the cache that the workspace's prepare.py reads.

- `corpus`: what every source yields (the three splits as batches of documents);
- `hub`: parquet sources downloaded from a base URL, with retries and resumed downloads;
- `files`: local files cut into documents and split by a hash of their paths;
- `tokenizer`: BPE training and the saved form prepare.py's `load_tokenizer` reads;
- `build`: the plan, the token shards, the manifest, the swap into place (`run_prepare`);
- `cli`: `python prepare.py ...`.

The format is the workspace's prepare.py's: `run_prepare` takes that module (`contract`) and
builds with its vocabulary size, tokenizer class and file names. Nothing here is fingerprinted
or copied into a workspace, so a fix here reaches every workspace with the next install.
"""
