"""One observation's evaluation, a batch of parsed hosts at a time.

A host's image derivation is a function of what core.hosts.eval_key digests (its
normalised definition, the recipe, and the ids of the packages it uses): hosts whose
key the ledger holds an image for are not sent to Nix again. The pass hands this a
batch of hosts as soon as they are parsed (reconciler.daemon.parsing), so that Nix
evaluates one batch while the next is parsed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from reconciler.core.hosts import NOT_READ_BY_PACKAGES, Fleet, Host, eval_key, package_names
from reconciler.core.model import PACKAGES_KEY, Evaluation, PackageIds
from reconciler.ports import Ledger, Nix, Source


class Evaluating:
    """The keys, the images the ledger holds and those Nix gave, of the hosts handed
    so far (``unknown``, ``add``), for the fleet ``result`` is asked for."""

    def __init__(
        self,
        ledger: Ledger,
        nix: Nix,
        source: Source,
        commit: str,
        recipe: str | None,
        defined: frozenset[str],
    ) -> None:
        self._ledger, self._nix, self._source = ledger, nix, source
        self._commit, self._recipe = commit, recipe
        self._defined = defined  # the packages the repository has (packages/NAME.nix)
        self._asked: frozenset[str] = frozenset()
        self._packages = PackageIds({}, {})
        self._keys: dict[str, str | None] = {}
        self._known: dict[str, str] = {}
        self._fresh: dict[str, str] = {}
        self._errors: dict[str, str] = {}

    def has(self, host: str) -> bool:
        """Whether ``host`` was handed in already."""
        return host in self._keys

    def unknown(self, hosts: Sequence[Host]) -> list[Host]:
        """Those of ``hosts`` Nix must evaluate: all without a recipe (nothing is then
        cached), else those whose key the ledger has no image for."""
        recipe = self._recipe
        if recipe is None:
            self._keys.update((h.name, None) for h in hosts)
            return list(hosts)
        names = frozenset(package_names(hosts))
        if not names <= self._asked:
            self._asked |= names
            self._packages = self._package_ids(recipe, self._asked)
        failed = self._packages.failed
        # A host using a package that does not evaluate fails as the package did, and
        # costs no evaluation of its own: one that never ends would cost each of its
        # hosts the deadline, on every pass.
        for h in hosts:
            bad = next((p for p in h.packages if p in failed), None)
            if bad is not None:
                self._errors[h.name] = f"package {bad}: {failed[bad]}"
        hosts = [h for h in hosts if h.name not in self._errors]
        keys = {h.name: eval_key(h, recipe, self._packages.ids) for h in hosts}
        self._keys.update(keys)
        known = self._ledger.evaluated({name: key for name, key in keys.items() if key is not None})
        self._known.update(known)
        return [h for h in hosts if h.name not in known]

    def add(self, evaluation: Evaluation) -> None:
        """What Nix gave for hosts ``unknown`` returned."""
        self._fresh.update(evaluation.images)
        self._errors.update(evaluation.errors)

    def result(self, fleet: Fleet) -> Evaluation:
        """The images and errors of ``fleet``'s hosts (a batch's host may be invalid in
        the whole fleet: a twin file), and the images Nix gave kept in the ledger under
        their keys."""
        hosts = fleet.hosts
        fresh = {name: image for name, image in self._fresh.items() if name in hosts}
        if self._ledger.durable:
            self._ledger.record_evaluated(
                {name: (key, image) for name, image in fresh.items() if (key := self._keys[name])}
            )
        known = {name: image for name, image in self._known.items() if name in hosts}
        errors = {name: why for name, why in self._errors.items() if name in hosts}
        return Evaluation(images={**known, **fresh}, errors=errors)

    def _package_ids(self, recipe: str, names: frozenset[str]) -> PackageIds:
        """The ids (Nix.package_ids) of at least ``names``, or why they have none,
        evaluated again only when a file the packages could read changed (anything
        outside hosts/ and profiles/, which Nix is not given: a package may import any
        other file of the repository): a README edit costs this one small evaluation of
        the packages, and no host's. The ledger keeps the last answer, and a later one
        asks for the packages it held too (those the repository still has), so that a
        batch needing fewer finds them there."""
        tree = self._source.tree_digest(self._commit, exclude=NOT_READ_BY_PACKAGES)
        key = hashlib.sha256(json.dumps([recipe, tree]).encode()).hexdigest()
        stored = self._ledger.get_meta(PACKAGES_KEY)
        data = json.loads(stored) if stored else {}
        ids: dict[str, str] = dict(data.get("ids") or {})
        failed: dict[str, str] = dict(data.get("failed") or {})
        if data.get("key") == key and names <= ids.keys() | failed.keys():
            return PackageIds(ids, failed)
        asked = sorted(names | ((ids.keys() | failed.keys()) & self._defined))
        got = self._nix.package_ids(asked, self._source.checkout)
        # A package stopped at a limit is asked again next time: the limit may have been
        # the machine's load. Any other failure is as lasting as an id.
        lasting = {name: why for name, why in got.failed.items() if name not in got.limited}
        self._ledger.set_meta(PACKAGES_KEY, json.dumps({"key": key, "ids": got.ids, "failed": lasting}))
        return got
