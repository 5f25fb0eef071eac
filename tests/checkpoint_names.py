"""The official checkpoint names of a model's tensors (what `save_pretrained` and the official files hold)."""

from g2tr_hf.compat import checkpoint_key


def official_state_dict(model) -> dict:
    """`model.state_dict()` under the checkpoint names: the module tree is split into a base model and a head, the
    files keep upstream's names (the model's `CHECKPOINT_RENAMES`)."""
    renames = __import__(type(model).__module__, fromlist=["CHECKPOINT_RENAMES"]).CHECKPOINT_RENAMES
    return {checkpoint_key(key, renames): value for key, value in model.state_dict().items()}
