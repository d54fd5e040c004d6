"""In-context-learning calibration: records, recalibration regimes, tables/plots, and a Hugging Face LM harness.

``ratelab.icl.harness`` needs the optional ``transformers`` package, imported only when its functions run.
"""

from ratelab.icl.datasets import TextDataset, load_text_classification
from ratelab.icl.harness import ICLPlan, label_log_probs, label_log_probs_ref, load_causal_lm, plan_icl, run_icl
from ratelab.icl.plots import plot_vs_shots
from ratelab.icl.prompts import PromptTemplate, Verbalizer, build_prompt, sample_demonstrations
from ratelab.icl.recalibration import evaluate_groups, evaluate_regimes, format_table, summarize, write_csv
from ratelab.icl.records import ICLRecords

__all__ = [
    "ICLPlan",
    "ICLRecords",
    "PromptTemplate",
    "TextDataset",
    "Verbalizer",
    "build_prompt",
    "evaluate_groups",
    "evaluate_regimes",
    "format_table",
    "label_log_probs",
    "label_log_probs_ref",
    "load_causal_lm",
    "load_text_classification",
    "plan_icl",
    "plot_vs_shots",
    "run_icl",
    "sample_demonstrations",
    "summarize",
    "write_csv",
]
