"""llmeraser: influence-function unlearning for PEFT-fine-tuned LLMs (LLMEraser, ICLR 2025, done carefully).

`llmeraser.callback.LLMEraserCallback` (a transformers TrainerCallback) is imported from its module, not here.
"""

from llmeraser.curvature import CurvatureOperator, gradient, objective_gradient, per_example_gradients
from llmeraser.damping import DampingArguments, select_damping
from llmeraser.data import DataFields, Example, Message, examples_hash, load_examples, save_examples
from llmeraser.eraser import (
    EraserArguments,
    UnlearningProblem,
    Update,
    choose_solver,
    compute_update,
    damping_path,
    declined_update,
    save_unlearned,
    unlearn,
)
from llmeraser.errors import (
    AdapterError,
    ConfigError,
    DataError,
    LLMEraserError,
    RequestError,
    ResourceError,
    SolverError,
    UserInputError,
)
from llmeraser.factors import FactorArguments, Factors, FactorStore, default_store, fit_factors
from llmeraser.finetune import (
    FinetuneArguments,
    FinetunedAdapter,
    FinetuneResult,
    finetune,
    finetune_adapter,
    save_finetuned,
)
from llmeraser.job import AdapterJob, UnlearnResult
from llmeraser.ledger import Ledger, LedgerError
from llmeraser.params import ParamView, adapter_hash, load_adapter, save_adapter
from llmeraser.record import LoraSettings, TrainingRecord, lora_model
from llmeraser.request import Edit, Request, apply_request, load_request, resolve
from llmeraser.solvers.api import get_solver, is_fitted, solve, solver_arguments, solver_names
from llmeraser.solvers.base import LinearOperator, MatrixOperator, SolverArguments, SolveResult
from llmeraser.task import CausalLMTask, Rendering, Task, per_example_loss
from llmeraser.updates import RequestContext, UnlearnOptions, get_method, method_names

__version__ = "0.1.0"

__all__ = [
    "AdapterJob", "LoraSettings", "TrainingRecord", "UnlearnResult", "declined_update", "is_fitted", "lora_model",
    "solver_names", "DataFields", "Message", "Rendering", "RequestContext", "UnlearnOptions", "get_method",
    "method_names",
    "AdapterError", "CausalLMTask", "ConfigError", "CurvatureOperator", "DataError", "Edit", "EraserArguments",
    "Example", "FinetuneArguments", "FinetuneResult", "LLMEraserError", "Ledger", "LedgerError", "LinearOperator",
    "MatrixOperator", "DampingArguments", "FactorArguments", "FactorStore", "Factors", "choose_solver",
    "default_store", "fit_factors", "select_damping",
    "ParamView", "Request", "RequestError", "ResourceError", "SolveResult", "SolverArguments", "SolverError", "Task",
    "UnlearningProblem", "Update", "UserInputError", "adapter_hash", "apply_request", "compute_update",
    "damping_path", "examples_hash", "finetune", "FinetunedAdapter", "finetune_adapter", "save_finetuned",
    "get_solver", "gradient", "load_adapter", "load_examples", "load_request", "objective_gradient",
    "per_example_gradients", "per_example_loss", "resolve", "save_adapter", "save_examples", "save_unlearned",
    "solve", "solver_arguments", "unlearn",
]
