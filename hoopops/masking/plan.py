"""A result's masking plan: what happens to each column, and the evidence it leaves.

A plan is built once per result shape (RowDescription, or CopyOutResponse for COPY) and
then applied to every row of that result. It keeps counts only — never a value — and
turns them into :class:`MaskingAction` records for the audit trail and the console.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hoopops.masking.codec import ColumnInfo
from hoopops.masking.detectors import DetectorSet
from hoopops.masking.rewrite import (
    D_SKIP,
    CopyRewriter,
    MaskingError,
    RowRewriter,
    ValueDetector,
    detect_class,
    field_mask,
    mask_class,
)
from hoopops.masking.sources import CopyOptions
from hoopops.masking.strategies import Strategy


@dataclass(frozen=True)
class MaskingAction:
    """One line of masking evidence: what was masked, how, and how many values.

    ``column`` is a source column (``public.customers.ssn``), ``derived(...)`` for values
    computed from sensitive columns, ``unknown(<result column>)`` for values the analysis
    could not trace, ``detector:<name>`` for detector hits, ``error_text`` for values
    redacted from error messages, or ``detectors`` for an exemption from detectors.
    ``strategy`` is the strategy label, or ``unmasked:<group>`` when the identity's group
    exempted it (then ``count`` is the number of rows returned unmasked).
    """

    column: str
    strategy: str
    count: int

    def to_dict(self) -> dict[str, str | int]:
        return {"column": self.column, "strategy": self.strategy, "count": self.count}


@dataclass(frozen=True)
class ColumnDecision:
    """What the plan does with one result column, and why (for tests, audit and console)."""

    index: int
    name: str
    label: str  # the MaskingAction column this decision reports under
    strategy: Strategy | None  # None: the column is not masked
    reason: str
    exempt: str | None = None  # the group that exempted this identity from ``strategy``
    detect: bool = False  # detectors run over this column

    @property
    def masked(self) -> bool:
        return self.strategy is not None and self.exempt is None


class ResultPlan:
    """Masks one result. Build with :meth:`MaskingRules.plan` / :meth:`MaskingRules.plan_copy`.

    ``rewrite_data_row(payload)``, ``rewrite_data_rows(messages)`` and
    ``rewrite_copy_data(chunk)`` return the bytes to forward; ``actions()`` /
    ``take_actions()`` report what was done. A plan is not thread-safe: it belongs to one
    result (one statement or portal) of one session.
    """

    def __init__(self, columns: Sequence[ColumnInfo], decisions: Sequence[ColumnDecision],
                 detectors: DetectorSet | None, detectors_exempt: str | None = None,
                 copy: CopyOptions | None = None, copy_binary: bool = False) -> None:
        self.columns = list(columns)
        self.decisions = list(decisions)
        self.detectors = detectors
        self.detectors_exempt = detectors_exempt
        self.copy = copy
        self.copy_binary = copy_binary
        detecting = detectors is not None and bool(detectors) and detectors_exempt is None
        self._value_detector = ValueDetector(detectors) if detecting and detectors else None
        masks = {d.index: field_mask(d.strategy, mask_class(c.wire_type, c.format_code))
                 for d, c in zip(self.decisions, self.columns, strict=True)
                 if d.masked and d.strategy is not None}
        detect = [detect_class(c.wire_type, c.format_code) if d.detect else D_SKIP
                  for d, c in zip(self.decisions, self.columns, strict=True)]
        self._row = RowRewriter(len(self.columns), masks,
                                detect if any(k != D_SKIP for k in detect) else None,
                                self._value_detector)
        # What the audit trail may keep of rows an exempt identity sees raw: the rows as
        # an identity without exemptions would get them.
        self._sample_row: RowRewriter | None = None
        if detectors_exempt is not None or any(d.exempt is not None for d in self.decisions):
            sample_masks = {d.index: field_mask(d.strategy, mask_class(c.wire_type,
                                                                       c.format_code))
                            for d, c in zip(self.decisions, self.columns, strict=True)
                            if d.strategy is not None}
            sample_detect = [detect_class(c.wire_type, c.format_code) if d.strategy is None
                             else D_SKIP for d, c in zip(self.decisions, self.columns,
                                                         strict=True)]
            sampler = ValueDetector(detectors) if detectors else None
            self._sample_row = RowRewriter(
                len(self.columns), sample_masks,
                sample_detect if sampler is not None and any(
                    k != D_SKIP for k in sample_detect) else None, sampler)
        self._copy: CopyRewriter | None = None
        self._taken: dict[tuple[str, str], int] = {}
        # Nothing to rewrite (only exemptions to count): count rows, forward the bytes.
        self._passthrough = not masks and not self._row.detecting
        if not self._passthrough:
            # The generated per-row function itself, not a method calling it: on the hot
            # path every Python call costs as much as the masking.
            self.rewrite_data_row = self._row.rewrite  # type: ignore[method-assign]

    @property
    def masked(self) -> list[ColumnDecision]:
        return [d for d in self.decisions if d.masked]

    @property
    def passthrough(self) -> bool:
        """True when rows are forwarded unchanged (the plan only counts exempted rows)."""
        return self._passthrough

    def rewrite_data_row(self, payload: bytes) -> bytes:
        """A DataRow payload (after the 'D' type byte and length) → the payload to send.

        Raises :class:`MaskingError` when the row does not match the RowDescription the
        plan was built for; the relay must then fail the statement, not forward it.
        """
        if self._passthrough:
            if payload[:2] != self._row.count_bytes:
                raise MaskingError("DataRow does not match its RowDescription")
            self._row.count_rows(1)
            return payload
        return self._row(payload)

    def sample_row(self, payload: bytes) -> bytes:
        """A DataRow payload as the audit trail may keep it: masked as for an identity
        without exemptions (so break-glass results never put raw values in the trail).
        Counts nothing; raises :class:`MaskingError` like :meth:`rewrite_data_row`."""
        if self._sample_row is None:
            return payload
        return self._sample_row(payload)

    def rewrite_data_rows(self, messages: bytes) -> bytes:
        """One or more complete DataRow *messages* ('D', length, payload, ...) → the
        messages to send. The fast form for a relay holding many rows in its read buffer:
        one call and one join per buffer instead of per row."""
        if not self._passthrough:
            return self._row.rewrite_messages(messages)
        pos = 0
        size = len(messages)
        count = self._row.count_bytes
        while pos < size:
            if messages[pos] != 68 or pos + 7 > size or messages[pos + 5:pos + 7] != count:
                raise MaskingError("expected complete DataRow messages of this result")
            pos += 1 + int.from_bytes(messages[pos + 1:pos + 5], "big")
            self._row.count_rows(1)
        if pos != size:
            raise MaskingError("incomplete DataRow message")
        return messages

    def rewrite_rows_at(self, data: bytes, start: int) -> tuple[bytes, int]:
        """Every complete DataRow message in ``data`` from ``start`` on, up to the first
        message that is something else or incomplete → ``(messages to send, where they
        ended)``: how a relay hands over all the rows of its read buffer in one call.
        Raises :class:`MaskingError` like :meth:`rewrite_data_row`."""
        if not self._passthrough:
            return self._row.rewrite_run(data, start)
        pos = start
        size = len(data)
        count = self._row.count_bytes
        rows = 0
        while size - pos >= 7 and data[pos] == 68:
            end = pos + 1 + int.from_bytes(data[pos + 1:pos + 5], "big")
            if end > size:
                break
            if data[pos + 5:pos + 7] != count or end < pos + 7:
                raise MaskingError("DataRow does not match its RowDescription")
            rows += 1
            pos = end
        self._row.count_rows(rows)
        return data[start:pos], pos

    def rewrite_copy_data(self, chunk: bytes, copy_format: CopyOptions | None = None) -> bytes:
        """A CopyData payload of ``COPY ... TO STDOUT`` → the payload to send.

        ``copy_format`` overrides the options the plan was built with (from the parsed
        COPY statement). Returns ``b""`` while a row is incomplete: send nothing then.
        """
        return self._copy_rewriter(copy_format).feed(chunk)

    def rewrite_copy_at(self, data: bytes, start: int) -> tuple[bytes, int]:
        """Every complete CopyData *message* in ``data`` from ``start`` on, up to the
        first other or incomplete one → ``(CopyData messages to send, where they
        ended)``: the batch form of :meth:`rewrite_copy_data` for a relay."""
        return self._copy_rewriter(None).feed_messages(data, start)

    def _copy_rewriter(self, copy_format: CopyOptions | None) -> CopyRewriter:
        if self._copy is None:
            options = copy_format or self.copy
            if options is None:
                raise MaskingError("COPY format unknown: the statement was not analysed")
            binary = self.copy_binary or options.format == "binary"
            masks = {d.index: d.strategy for d in self.decisions
                     if d.masked and d.strategy is not None}
            self._copy = CopyRewriter(options, binary, len(self.columns), masks,
                                      self._value_detector, [d.detect for d in self.decisions])
        return self._copy

    def finish_copy(self) -> None:
        """Call at CopyDone; raises :class:`MaskingError` if the data ended mid-row."""
        if self._copy is not None:
            self._copy.finish()

    def _totals(self) -> dict[tuple[str, str], int]:
        totals: dict[tuple[str, str], int] = {}

        def add(column: str, strategy: str, count: int) -> None:
            if count:
                totals[(column, strategy)] = totals.get((column, strategy), 0) + count

        row_counts = dict(zip(self._row.target_index, self._row.mask_counts, strict=True))
        copy_counts = self._copy.mask_counts if self._copy is not None else {}
        for decision in self.decisions:
            if decision.strategy is None:
                continue
            if decision.exempt is not None:
                add(decision.label, f"unmasked:{decision.exempt}", self.rows)
                continue
            count = row_counts.get(decision.index, 0) + copy_counts.get(decision.index, 0)
            add(decision.label, decision.strategy.label, count)
        if self.detectors and self.detectors_exempt is not None:
            add("detectors", f"unmasked:{self.detectors_exempt}", self.rows)
        if self._value_detector is not None and self.detectors is not None:
            labels = {d.name: d.strategy.label for d in self.detectors.detectors}
            for name, count in self._value_detector.replaced.items():
                add(f"detector:{name}", labels.get(name, "redact"), count)
            for name, count in self._value_detector.nulled.items():
                add(f"detector:{name}", "null", count)
            for name, count in self._value_detector.whole.items():
                add(f"detector:{name}", "redact", count)
        return totals

    def actions(self) -> list[MaskingAction]:
        """Everything this plan has done so far (cumulative)."""
        return [MaskingAction(c, s, n) for (c, s), n in sorted(self._totals().items())]

    def take_actions(self) -> list[MaskingAction]:
        """What was done since the previous call: call at CommandComplete,
        PortalSuspended or ErrorResponse so each execution is reported once."""
        totals = self._totals()
        fresh = []
        for key, count in sorted(totals.items()):
            delta = count - self._taken.get(key, 0)
            if delta:
                fresh.append(MaskingAction(key[0], key[1], delta))
        self._taken = totals
        return fresh

    @property
    def rows(self) -> int:
        """Rows seen so far (DataRows and COPY rows)."""
        return self._row.rows + (self._copy.rows if self._copy is not None else 0)
