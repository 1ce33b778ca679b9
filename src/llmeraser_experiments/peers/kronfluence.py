"""A peer EK-FAC: kronfluence 1.0.1's factors on our PEFT LoRA model and data, as a damped solve in our convention.

    factors = fit_kronfluence(model, task, examples, workdir=tmp)   # covariance → eigendecomposition → lambda
    x = kronfluence_solve(factors, model, b, damping=1e-3)          # x ≈ (H + λI)⁻¹ b, b in ParamView order

kronfluence is installed with `pip install --no-deps kronfluence==1.0.1 einops einconv opt_einsum` (the Makefile's
bench target does it): its declared dependencies would replace the CPU torch with a CUDA build (torchvision is
declared but never imported).

What is fitted. kronfluence wraps every tracked nn.Linear (here the LoRA `lora_A.default` / `lora_B.default`
modules, named as in `model.named_modules()`) and, per module with weight W (out, in):
- covariance phase: A = Σ_tokens a aᵀ and S = Σ_tokens g gᵀ (a: module input, g: gradient of the batch loss at the
  module output), each divided by its token count before the eigendecomposition (factor/eigen.py,
  `perform_eigendecomposition`: `covariance_matrix.div_(covariance_factors[num_processed_name][module_name])`;
  the counts are attention-mask sums, module/linear.py `get_flattened_activation`). Only the eigenvectors Q_A, Q_S
  are used by EK-FAC, so this normalisation does not matter.
- lambda phase: Λ = Σᵢ (Q_Sᵀ Gᵢ Q_A)², squared, summed over examples i (module/tracker/factor.py,
  `LambdaTracker._update_lambda_matrix`), Gᵢ (out, in) the gradient of example i's term of the batch loss
  (`compute_per_sample_gradient`, einsum "b...i,b...o->bio" = Σ_t g_t a_tᵀ), and NUM_LAMBDA_PROCESSED = the number of
  examples (`find_batch_size` of each batch). At preconditioning kronfluence divides Λ by that count and adds damping
  (factor/config.py, `Ekfac.prepare`: `lambda_matrix.div_(storage[NUM_LAMBDA_PROCESSED])`, then
  `lambda_matrix.add_(damping_factor)` with the heuristic 0.1·mean(Λ/N) when none is given), and applies
  Q_S [(Q_Sᵀ V Q_A) / (Λ/N + λ)] Q_Aᵀ (`Ekfac.precondition_gradient`). So Λ/N is the EK-FAC diagonal of
  F = (1/N) Σᵢ E[∇L̃ᵢ ∇L̃ᵢᵀ], where L̃ᵢ is example i's term of `compute_train_loss`.

Scale, in our convention H = (1/N) Σᵢ GGN(ℓᵢ), ℓᵢ = (1/rᵢ) Σ_t NLL_t the mean NLL over example i's rᵢ response
tokens. Write K_t = J_tᵀ (diag p_t − p_t p_tᵀ) J_t. With labels ŷ_t sampled from the model's softmax, E[∇NLL_t(ŷ)] = 0
and the tokens are independent, so L̃ᵢ = c Σ_t NLL_t(ŷ_t) has E[∇L̃ᵢ ∇L̃ᵢᵀ] = c² Σ_t K_t, while GGN(ℓᵢ) = (1/rᵢ) Σ_t K_t.
Hence:
- L̃ᵢ = ℓᵢ(ŷ) (our loss with sampled labels, c = 1/rᵢ) gives GGN(ℓᵢ)/rᵢ: too small by the response length, and not
  by a constant factor when lengths vary;
- kronfluence's language-model recipe, L̃ᵢ = Σ_t NLL_t(ŷ) (c = 1), gives rᵢ·GGN(ℓᵢ);
- L̃ᵢ = ℓᵢ(ŷ)·√rᵢ (c = 1/√rᵢ), used here, gives exactly GGN(ℓᵢ) in expectation, so Λ/N estimates the EK-FAC diagonal
  of our H with scale factor 1 and `kronfluence_solve` needs no rescaling.
With `empirical_fisher=True` the labels are the data's and L̃ᵢ = ℓᵢ, so Λ/N is the EK-FAC diagonal of the empirical
Fisher (1/N) Σᵢ ∇ℓᵢ ∇ℓᵢᵀ of our per-example loss (again scale 1, a different matrix from the GGN).

Checked in tests/test_kronfluence_peer.py on a tiny LoRA LM: the empirical-Fisher Λ/N equals the diagonal of our
(1/N) Σᵢ ∇ℓᵢ∇ℓᵢᵀ in kronfluence's basis to 1e-16; `kronfluence_solve` equals kronfluence's own preconditioner
(pairwise scores with damping_factor = λ) to 1e-16; the sampled Λ/N has trace(Λ/N)/trace(H_block) 0.93-1.09 (the
mean-loss and summed-token conventions give 0.15-0.20 and 8.7-10.8).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmeraser.data import Example
from llmeraser.params import ParamView
from llmeraser.task import IGNORE_INDEX, Task

try:  # optional: the bench installs it with --no-deps
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.module.tracked_module import TrackedModule
    from kronfluence.task import Task as KronfluenceTask
    from kronfluence.utils.dataset import DataLoaderKwargs
except ImportError:  # pragma: no cover - exercised only without kronfluence
    KronfluenceTask = object  # type: ignore[assignment,misc]
    _IMPORT_ERROR: ImportError | None = ImportError(
        "kronfluence is not installed: pip install --no-deps kronfluence==1.0.1 einops einconv opt_einsum")
else:
    _IMPORT_ERROR = None

ANALYSIS_NAME = "peer"
FACTORS_NAME = "ekfac"
PHASES = ("covariance", "eigendecomposition", "lambda")


@dataclass
class KronfluenceFactors:
    """kronfluence's EK-FAC factors per tracked module, with Λ already in our curvature convention.

    Attributes:
        modules: tracked module names (as in `model.named_modules()`), in kronfluence's order.
        activation_eigenvectors: module → Q_A (in, in), columns are eigenvectors of the input covariance.
        gradient_eigenvectors: module → Q_S (out, out), eigenvectors of the output-gradient covariance.
        lambda_matrix: module → (out, in), the corrected eigenvalues Λ/N: the EK-FAC diagonal of H in the basis
            Q_S ⊗ Q_A of the row-major (out, in) weight (entry [o, i] pairs gradient eigenvector o with activation
            eigenvector i).
        activation_eigenvalues, gradient_eigenvalues: module → the K-FAC eigenvalues (covariances per token).
        num_examples: N, the examples the factors average over (NUM_LAMBDA_PROCESSED / label_samples).
        label_samples: label draws per example (the data were repeated this many times).
        empirical_fisher: True when the data's labels were used instead of sampled ones.
        seconds: wall seconds of each phase (covariance, eigendecomposition, lambda) and their total, each
            including kronfluence's own saving of the factors to `workdir`.
        workdir: where kronfluence wrote its analysis (`workdir/peer/factors_ekfac/*.safetensors`).
    """

    modules: list[str]
    activation_eigenvectors: dict[str, torch.Tensor]
    gradient_eigenvectors: dict[str, torch.Tensor]
    lambda_matrix: dict[str, torch.Tensor]
    activation_eigenvalues: dict[str, torch.Tensor]
    gradient_eigenvalues: dict[str, torch.Tensor]
    num_examples: int
    label_samples: int
    empirical_fisher: bool
    seconds: dict[str, float] = field(default_factory=dict)
    workdir: Path | None = None


class _Examples(torch.utils.data.Dataset):
    """Our examples as a map-style dataset, repeated `repeats` times (index i → examples[i mod N])."""

    def __init__(self, examples: Sequence[Example], repeats: int = 1):
        self.examples, self.repeats = list(examples), repeats

    def __len__(self) -> int:
        return len(self.examples) * self.repeats

    def __getitem__(self, i: int) -> Example:
        return self.examples[i % len(self.examples)]


class PeerTask(KronfluenceTask):
    """kronfluence's view of an llmeraser task whose batches carry `targets` (-100 = no loss), e.g. CausalLMTask.

    Train loss: Σᵢ ℓᵢ over the batch with the data's labels (empirical Fisher); with `sample=True` (true Fisher)
    each kept position's label is drawn from the model's softmax and example i contributes ℓᵢ(ŷ)·√rᵢ, rᵢ its
    number of response tokens, so that E[∇∇ᵀ] is the Gauss-Newton matrix of ℓᵢ (module docstring).
    """

    def __init__(self, task: Task, modules: list[str], seed: int = 0):
        self.task, self.modules = task, modules
        self.generator = torch.Generator().manual_seed(seed)

    def _sampled_batch(self, logits: torch.Tensor, batch: dict) -> dict:
        targets = batch["targets"]
        with torch.no_grad():
            probs = torch.softmax(logits.detach().double(), dim=-1).reshape(-1, logits.shape[-1])
            sampled = torch.multinomial(probs.cpu(), 1, generator=self.generator).view(targets.shape)
            sampled = sampled.to(targets.device).masked_fill(targets == IGNORE_INDEX, IGNORE_INDEX)
        return {**batch, "targets": sampled}

    def compute_train_loss(self, batch: dict, model: nn.Module, sample: bool = False) -> torch.Tensor:
        logits = self.task.forward(model, batch)
        if not sample:
            return self.task.loss(logits, batch).sum()
        counts = (batch["targets"] != IGNORE_INDEX).sum(1).clamp(min=1).to(logits.dtype)
        return (self.task.loss(logits, self._sampled_batch(logits, batch)) * counts.sqrt()).sum()

    def compute_measurement(self, batch: dict, model: nn.Module) -> torch.Tensor:
        return self.task.loss(self.task.forward(model, batch), batch).sum()

    def get_influence_tracked_modules(self) -> list[str]:
        return list(self.modules)

    def get_attention_mask(self, batch: dict) -> torch.Tensor:
        return batch["attention_mask"]


def trainable_linear_modules(model: nn.Module) -> list[str]:
    """Names of the leaf nn.Linear modules whose weight is trainable (the LoRA A/B of a peft model).

    Raises ValueError when a trainable parameter lies outside them (kronfluence would give it no curvature).
    """
    names, covered = [], set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not list(module.children()) and module.weight.requires_grad:
            names.append(name)
            covered.update(f"{name}.{p}" for p, _ in module.named_parameters(recurse=False))
    missing = [n for n in ParamView(model).names if n not in covered]
    if missing:
        raise ValueError(f"trainable parameters outside trainable nn.Linear modules: {', '.join(missing[:5])}")
    return names


@contextlib.contextmanager
def _quiet():
    """kronfluence's INFO logs and deprecation warnings off; the root logger's level untouched (kronfluence's
    `get_logger(log_level=...)` would set it, so no level is passed)."""
    logger = logging.getLogger("kronfluence")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _prepared(model: nn.Module, task: PeerTask):
    """The model with kronfluence's TrackedModule wrappers installed in place; on exit the original modules,
    requires_grad flags, train/eval modes and .grad tensors are put back."""
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    training = {n: m.training for n, m in model.named_modules()}
    try:
        yield prepare_model(model, task)
    finally:
        for module in [m for m in model.modules() if isinstance(m, TrackedModule)]:
            parent_name, _, attr = module.name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, module.original_module)
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
            p.grad = grads[n]
        for n, m in model.named_modules():
            m.training = training[n]


def fit_kronfluence(model: nn.Module, task: Task, examples: Sequence[Example], *, workdir: str | Path,
                    batch_size: int = 8, seed: int = 0, empirical_fisher: bool = False,
                    label_samples: int = 1) -> KronfluenceFactors:
    """Fit kronfluence's EK-FAC factors of the trainable LoRA nn.Linear modules of `model` on `examples`.

    Args:
        model: a peft model whose trainable parameters are LoRA A/B weights (left unchanged).
        task: our task (`collate`, `forward`, `loss`); batches must carry `targets` and `attention_mask`.
        examples: the N training examples H averages over.
        workdir: kronfluence's output folder (its factors are written under workdir/peer/factors_ekfac).
        batch_size: examples per batch in both data passes.
        seed: seeds the label sampling of the true Fisher.
        empirical_fisher: use the data's labels (kronfluence's `use_empirical_fisher`) instead of sampled ones.
        label_samples: label draws per example (the data are repeated; Λ/N averages them). Ignored with
            `empirical_fisher`.
    """
    if _IMPORT_ERROR is not None:
        raise _IMPORT_ERROR
    if not examples:
        raise ValueError("fit_kronfluence needs at least one example")
    if label_samples < 1:
        raise ValueError(f"label_samples must be ≥ 1, got {label_samples}")
    repeats = 1 if empirical_fisher else label_samples
    modules = trainable_linear_modules(model)
    dtype = torch.float64 if ParamView(model).dtype == torch.float64 else torch.float32
    args = FactorArguments(strategy="ekfac", use_empirical_fisher=empirical_fisher, covariance_max_examples=None,
                           lambda_max_examples=None, activation_covariance_dtype=dtype,
                           gradient_covariance_dtype=dtype, eigendecomposition_dtype=torch.float64,
                           per_sample_gradient_dtype=dtype, lambda_dtype=dtype)
    peer = PeerTask(task, modules, seed=seed)
    dataset = _Examples(examples, repeats)
    loader_kwargs = DataLoaderKwargs(collate_fn=task.collate)
    workdir = Path(workdir)
    cpu = ParamView(model).device.type == "cpu"
    seconds: dict[str, float] = {}
    with _quiet(), _prepared(model, peer) as prepared:
        analyzer = Analyzer(analysis_name=ANALYSIS_NAME, model=prepared, task=peer, cpu=cpu, disable_tqdm=True,
                            output_dir=str(workdir), disable_model_save=True)
        data_kw = {"dataset": dataset, "per_device_batch_size": batch_size, "dataloader_kwargs": loader_kwargs}
        common = {"factors_name": FACTORS_NAME, "factor_args": args, "overwrite_output_dir": True}
        for phase, call in (("covariance", lambda: analyzer.fit_covariance_matrices(**common, **data_kw)),
                            ("eigendecomposition", lambda: analyzer.perform_eigendecomposition(**common)),
                            ("lambda", lambda: analyzer.fit_lambda_matrices(**common, **data_kw))):
            start = time.perf_counter()
            call()
            seconds[phase] = time.perf_counter() - start
        seconds["total"] = sum(seconds[p] for p in PHASES)
        loaded = analyzer.load_all_factors(FACTORS_NAME)
    processed = {m: int(c.reshape(-1)[0]) for m, c in loaded["num_lambda_processed"].items()}
    expected = len(examples) * repeats
    if any(c != expected for c in processed.values()):
        raise RuntimeError(f"kronfluence processed {processed} examples for Λ, expected {expected}")
    return KronfluenceFactors(
        modules=list(loaded["lambda_matrix"]),
        activation_eigenvectors=dict(loaded["activation_eigenvectors"]),
        gradient_eigenvectors=dict(loaded["gradient_eigenvectors"]),
        lambda_matrix={m: lam.double() / processed[m] for m, lam in loaded["lambda_matrix"].items()},
        activation_eigenvalues=dict(loaded["activation_eigenvalues"]),
        gradient_eigenvalues=dict(loaded["gradient_eigenvalues"]),
        num_examples=len(examples), label_samples=repeats, empirical_fisher=empirical_fisher, seconds=seconds,
        workdir=workdir)


def _blocks(factors: KronfluenceFactors, model: nn.Module, v: torch.Tensor):
    """(view, per-parameter chunks of v, [(module, [param indices], (out, in+bias) matrix of v)])."""
    view = ParamView(model)
    chunks = view.unflatten(v)
    index = {n: i for i, n in enumerate(view.names)}
    unknown = [n for n in view.names if n.rpartition(".")[0] not in factors.lambda_matrix]
    if unknown:
        raise ValueError(f"no kronfluence factors for trainable parameters {', '.join(unknown[:5])}")
    blocks = []
    for module in factors.modules:
        w, b = index.get(f"{module}.weight"), index.get(f"{module}.bias")
        if w is None:
            raise ValueError(f"kronfluence module {module!r} has no trainable weight {module}.weight in this model")
        mat = chunks[w] if b is None else torch.cat([chunks[w], chunks[b][:, None]], dim=1)
        shape = tuple(factors.lambda_matrix[module].shape)
        if tuple(mat.shape) != shape:
            raise ValueError(f"{module}: parameter block {tuple(mat.shape)} but kronfluence Λ is {shape}")
        blocks.append((module, [w] if b is None else [w, b], mat))
    return view, chunks, blocks


def _apply(factors: KronfluenceFactors, model: nn.Module, v: torch.Tensor, diag) -> torch.Tensor:
    """Q [diag(Λ) ∘ (Qᵀ v)] block by block, with diag(Λ) → `diag(Λ)`, in float64; returned in v's dtype."""
    view, chunks, blocks = _blocks(factors, model, v.detach().to(torch.float64).cpu())
    out = [c.clone() for c in chunks]
    for module, idx, mat in blocks:
        qa = factors.activation_eigenvectors[module].to(torch.float64)
        qs = factors.gradient_eigenvectors[module].to(torch.float64)
        res = qs @ ((qs.T @ mat @ qa) * diag(factors.lambda_matrix[module])) @ qa.T
        out[idx[0]] = res[:, : out[idx[0]].shape[1]]
        if len(idx) == 2:
            out[idx[1]] = res[:, -1]
    return torch.cat([o.reshape(-1) for o in out]).to(dtype=v.dtype, device=v.device)


def kronfluence_matvec(factors: KronfluenceFactors, model: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """F_ekfac v with kronfluence's factors (block-diagonal over modules), v in ParamView(model) order."""
    return _apply(factors, model, v, lambda lam: lam)


def kronfluence_solve(factors: KronfluenceFactors, model: nn.Module, b: torch.Tensor, damping: float) -> torch.Tensor:
    """x = (F_ekfac + λI)⁻¹ b block by block: Q_S [(Q_Sᵀ B Q_A) / (Λ/N + λ)] Q_Aᵀ per LoRA module.

    `b` is flat in ParamView(model) order (`<module>.weight` blocks, LoRA A (r, in), B (out, r)); λ = `damping` is
    added to the corrected eigenvalues as is (not kronfluence's heuristic 0.1·mean). Λ/N is on the scale of our
    H = (1/N) Σᵢ GGN(ℓᵢ) (module docstring), so x approximates (H + λI)⁻¹ b.
    """
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be finite and ≥ 0, got {damping}")
    smallest = min(float((lam + damping).min()) for lam in factors.lambda_matrix.values())
    if smallest <= 0:
        raise ValueError(f"Λ/N + damping has a non-positive entry ({smallest:.3g}); use a larger damping")
    return _apply(factors, model, b, lambda lam: 1.0 / (lam + damping))
