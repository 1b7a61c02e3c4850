"""Plain-text tables the command line prints: aligned columns, and a quantized artifact's record."""

from __future__ import annotations


def table_lines(rows: list[list]) -> list[str]:
    """Each row's cells left-aligned in columns, two spaces apart, indented by two."""
    if not rows:
        return []
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def quantization_lines(record: dict) -> list[str]:
    """How a quantized artifact was made (the manifest's `quantization`) and its drift report, as
    `convert` prints them."""
    how = (f"int{record['bits']} weights ({record['method']}, blocks of {record['block_size']}, "
           f"{record['matrices']} matrices), head {record['head']}, embedding {record['embedding']}")
    lines = [how] + [f"  {name}: {what} (its inputs do not split into blocks of {record['block_size']})"
                     for name, what in record.get("fallbacks", {}).items()]
    drift = record.get("drift")
    if drift:
        tokens = f", {drift['new_tokens']} greedy tokens each" if "new_tokens" in drift else ""
        what = "top-1 agreement" if "new_tokens" in drift else "label agreement"
        lines.append(f"drift from the {drift['reference']} ({drift['prompts']} fixed prompts{tokens}):")
        lines += table_lines([["task", what, "max |Δlogits|"]] + [
            [task, f"{d['agreement']:.3f}", f"{d['max_abs_diff']:.3g}"] for task, d in drift["tasks"].items()])
    return lines


def validate_lines(checks: list, failed: list, atol: float, new_tokens: int, min_agreement: float) -> list[str]:
    """`spexport validate`'s table (a quantized artifact: agreement with PEFT beside convert's) and verdict."""
    if any(c.agreement is not None for c in checks):
        lines = table_lines([["task", "top-1 agreement with PEFT", "at convert (vs float32)", "max |Δlogits|", ""]]
                            + [[c.task, f"{c.agreement:.3f}",
                                "-" if c.recorded_agreement is None else f"{c.recorded_agreement:.3f}",
                                f"{c.max_abs_diff:.3g}", "ok" if c.passed else "FAIL"] for c in checks])
        verdict = f"all {len(checks)} quantized tasks agree with PEFT at or above {min_agreement:g}"
    else:
        lines = table_lines([["task", "max |Δlogits|", "greedy agreement", ""]]
                            + [[c.task, f"{c.max_abs_diff:.2e}", f"{c.greedy_agreement:.3f}",
                                "ok" if c.passed else "FAIL"] for c in checks])
        verdict = f"all {len(checks)} tasks match PEFT (atol {atol:g}, {new_tokens} greedy tokens)"
    return lines + ([] if failed else [verdict])


def validate_failure(checks: list, failed: list, atol: float, min_agreement: float) -> str:
    """The one-line error of a validate run in which some tasks failed."""
    names = ", ".join(c.task for c in failed)
    if any(c.agreement is not None for c in checks):
        return f"error: {len(failed)} of {len(checks)} quantized tasks agree with PEFT below {min_agreement:g}: {names}"
    return (f"error: {len(failed)} of {len(checks)} tasks differ from PEFT (atol {atol:g}, all greedy tokens "
            f"equal): {names}")
