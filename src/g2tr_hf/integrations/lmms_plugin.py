"""lmms-eval registration of g2tr_hf (the `lmms_eval.models` entry point).

lmms-eval (0.6 and later) loads every entry point of the group `lmms_eval.models` when its model registry is imported;
g2tr_hf declares `g2tr = g2tr_hf.integrations.lmms_plugin:manifests`. This module stays import-light on purpose:
lmms-eval loads all plugins inside one `try`, so an import error here would hide every plugin model, and importing
torch or transformers here would slow down every lmms-eval start. The model class lives in `lmms_models` and is
imported only when a run asks for `--model g2tr`.
"""

from __future__ import annotations


__all__ = ["MODEL_ID", "manifests"]

MODEL_ID = "g2tr"
MODEL_CLASS_PATH = "g2tr_hf.integrations.lmms_models.G2TRLMMs"


def manifests():
    """The manifests lmms-eval registers: one model id, `g2tr`, whose class serves BAGEL and InternVL-U folders."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH)]
