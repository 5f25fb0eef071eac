"""Integrations of g2tr_hf models with third-party evaluation harnesses.

`batch_generation` holds the harness-independent part (batched understanding requests with per-sample token, KV and
prefill-time accounting); `lmms_plugin` / `lmms_models` / `lmms_tasks` plug it into lmms-eval through the
`lmms_eval.models` entry point. Nothing here is imported by `import g2tr_hf`, and only `lmms_models` / `lmms_tasks`
import lmms-eval.
"""
