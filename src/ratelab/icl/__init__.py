"""In-context-learning calibration: records, recalibration regimes, tables/plots, a Hugging Face LM harness, and
the same records for a model trained on synthetic few-shot tasks (:func:`collect_records`).

``ratelab.icl.harness`` needs the optional ``transformers`` package, imported only when its functions run.
"""

from ratelab.icl.datasets import TextDataset, load_text_classification
from ratelab.icl.harness import ICLPlan, label_log_probs, label_log_probs_ref, load_causal_lm, plan_icl, run_icl
from ratelab.icl.plots import plot_vs_shots
from ratelab.icl.prompts import PromptTemplate, Verbalizer, build_prompt, sample_demonstrations
from ratelab.icl.recalibration import evaluate_groups, evaluate_regimes, format_table, summarize, write_csv
from ratelab.icl.records import ICLRecords
from ratelab.icl.synthetic import collect_records

__all__ = [
    "ICLPlan",
    "ICLRecords",
    "PromptTemplate",
    "TextDataset",
    "Verbalizer",
    "build_prompt",
    "collect_records",
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
