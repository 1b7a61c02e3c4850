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


def inspect_lines(report) -> list[str]:
    """`spexport inspect`'s text report of an `inspect.Report`."""
    s, model = report.summary, report.summary["model"]
    lines = [f"{report.folder}: {s['family']} ({model['model_type']}), {model['num_layers']} layers, "
             f"vocab {model['vocab_size']}, {model['max_positions']} positions, format {s['format_version']}",
             f"prompt bank: {'baked into ' + s['graph'] if s['baked'] else s['prompt_bank']}"]
    if "encoder_graph" in s:
        lines.append(f"encoder graph: {s['encoder_graph']} (ports below are the decoder's)")
    lines += ["tasks:", *table_lines([["id", "name", "method", "virtual tokens", "bytes"]]
                                     + [[t["id"], t["name"], t["method"], t["num_virtual_tokens"], t["bytes"]]
                                        for t in s["tasks"]])]
    if s.get("ensembles"):
        lines += ["ensembles:", *table_lines([[name, ", ".join(members)] for name, members in s["ensembles"].items()])]
    lines.append(f"graph {s['graph']}:")
    if report.graph_error:
        lines.append(f"  unreadable: {report.graph_error}")
    lines += table_lines([[kind, p.name, p.dtype, "[" + ", ".join("?" if d is None else str(d) for d in p.shape) + "]"]
                          for kind, ports in [("input", report.inputs), ("output", report.outputs)] for p in ports])
    lines += ["execution providers: " + ", ".join(report.providers), "files:"]
    return lines + table_lines([[status, rel] for rel, status in report.files.items()])
