"""Fitted factors on disk, keyed by the adapter's weights hash and the training set's hash, and handed on.

`FactorStore` keeps each fit as safetensors plus meta.json under a folder (by default `<adapter>.factors`, beside the
adapter); a fit whose keys do not match is stale and refitted. After a request is applied the new adapter inherits
the fit (`derive`) while the examples edited since the last real fit stay within `refit_fraction` of the training
set; beyond it the next request refits. The damping `tune-damping` chose is kept beside the fits, keyed the same way,
because it was chosen for them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from llmeraser.errors import UserInputError
from llmeraser.factors.capture import Block
from llmeraser.factors.fit import FORMAT, Factors
from llmeraser.io import atomic_dir, sha256_file
from llmeraser.schema import read_json

FACTORS_FILE, META_FILE, DAMPING_FILE = "factors.safetensors", "meta.json", "damping.json"

def default_store(adapter: str | os.PathLike) -> Path:
    """`<adapter>.factors`, beside the adapter folder."""
    p = Path(adapter).resolve()
    return p.with_name(p.name + ".factors")


class FactorStore:
    """Fitted factors on disk: `<root>/<kind>/{factors.safetensors, meta.json}`, keyed by the adapter's weights
    hash and the training set's hash (`meta.json`: adapter_sha256, train_sha256, and the fit's details)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def load(self, kind: str, adapter_sha256: str, train_sha256: str) -> tuple[Factors | None, str]:
        """(factors, why): the stored fit of `kind` if its keys match, else (None, the reason it cannot be used)."""
        folder = self.root / kind
        if not (folder / META_FILE).is_file():
            return None, f"no {kind} factors in {self.root}"
        from safetensors import SafetensorError

        try:
            meta = read_json(folder / META_FILE)
            if not isinstance(meta, dict):
                raise TypeError(f"{META_FILE} is not a JSON object")
            if meta.get("format") != FORMAT:
                return None, f"stored {kind} factors have format {meta.get('format')}, this version reads {FORMAT}"
            if meta.get("adapter_sha256") != adapter_sha256:
                return None, f"stored {kind} factors were fitted for another adapter (its weights changed)"
            if meta.get("train_sha256") != train_sha256:
                return None, f"stored {kind} factors were fitted on another training set"
            if meta.get("factors_sha256") not in (None, sha256_file(folder / FACTORS_FILE)):
                return None, (f"stored {kind} factors in {folder} fail their checksum (the file changed after it was "
                              f"fitted)")
            from safetensors.torch import load_file

            tensors = load_file(str(folder / FACTORS_FILE))
            blocks = [Block(**b) for b in meta["blocks"]]
        except (OSError, ValueError, KeyError, TypeError, SafetensorError, UserInputError) as e:
            return None, f"stored {kind} factors in {folder} are unreadable ({type(e).__name__}: {e})"
        return Factors(kind, blocks, tensors, meta), f"loaded from {folder}"

    def save(self, factors: Factors, adapter_sha256: str, train_sha256: str, **extra: object) -> Path:
        """Write `factors` under `<root>/<kind>` atomically (replacing an older fit of that kind)."""
        from safetensors.torch import save_file

        meta = {**factors.meta, **extra, "adapter_sha256": adapter_sha256, "train_sha256": train_sha256}
        target = self.root / factors.kind
        self.root.mkdir(parents=True, exist_ok=True)
        old = None
        if target.exists():
            old = target.with_name(f".{factors.kind}.old-{os.getpid()}")
            target.rename(old)
        with atomic_dir(target) as tmp:
            save_file(factors.tensors, str(tmp / FACTORS_FILE))
            meta["factors_sha256"] = sha256_file(tmp / FACTORS_FILE)  # verified when loaded
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        factors.meta = meta
        return target

    def save_damping(self, record: dict, adapter_sha256: str, train_sha256: str) -> Path:
        """Store the damping `damping.select_damping` chose, keyed like the factors."""
        from llmeraser.io import atomic_write_json

        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / DAMPING_FILE
        atomic_write_json(path, {**record, "adapter_sha256": adapter_sha256, "train_sha256": train_sha256})
        return path

    def load_damping(self, adapter_sha256: str, train_sha256: str) -> tuple[dict | None, str]:
        """(record, why): the stored damping choice if it was made for this adapter and training set."""
        path = self.root / DAMPING_FILE
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None, f"no damping chosen yet in {self.root}"
        except (OSError, ValueError) as e:
            return None, f"{path} is unreadable ({type(e).__name__})"
        if record.get("adapter_sha256") != adapter_sha256 or record.get("train_sha256") != train_sha256:
            return None, f"the damping in {path} was chosen for another adapter or training set"
        return record, f"chosen by tune-damping ({path})"

    def derive(self, factors: Factors, source: FactorStore, adapter_sha256: str, train_sha256: str, *,
               edited: int, refit_fraction: float, request_sha256: str) -> tuple[bool, str]:
        """Record `factors` (fitted for an earlier adapter in `source`) as this store's fit for the adapter a request
        produced, unless the examples edited since the last real fit exceed `refit_fraction` of the training set.

        The factors are averages over the N training examples taken at θ̂: a request that edits k of them changes
        them by O(k/N), and Δθ moves the activations they were taken at by O(‖Δθ‖); both are small next to the Monte
        Carlo noise of a fit while k/N is small, so the fit is reused (hard-linked, no copy) until the edits add up.
        Returns (derived, why)."""
        n = int(factors.meta.get("n_train", factors.meta["n_examples"]))
        since = int(factors.meta.get("edited_since_fit", 0)) + edited
        if since > refit_fraction * n:
            return False, (f"{since} examples edited since the {factors.kind} fit ({since / n:.1%} of {n} > "
                           f"refit fraction {refit_fraction:.0%}): the next request refits")
        src = source.root / factors.kind
        target = self.root / factors.kind
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {**factors.meta, "adapter_sha256": adapter_sha256, "train_sha256": train_sha256,
                "edited_since_fit": since, "derived_from": {"adapter_sha256": factors.meta.get("adapter_sha256"),
                                                            "request_sha256": request_sha256}}
        if target.exists():
            shutil.rmtree(target)
        with atomic_dir(target) as tmp:
            try:
                os.link(src / FACTORS_FILE, tmp / FACTORS_FILE)
            except OSError:  # another file system: copy
                shutil.copyfile(src / FACTORS_FILE, tmp / FACTORS_FILE)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        damping = source.root / DAMPING_FILE
        if damping.is_file():  # the λ chosen for the lineage's fit goes with it, re-keyed
            record = json.loads(damping.read_text())
            if record.get("adapter_sha256") == factors.meta.get("adapter_sha256"):
                self.save_damping({**record, "derived": True}, adapter_sha256, train_sha256)
        return True, (f"{factors.kind} factors reused for the new adapter: {since} of {n} examples "
                      f"({since / n:.1%}) edited since the fit, within the refit fraction {refit_fraction:.0%}")
