"""What a run did, one row per stage: state (built by this run, or cached), build time and the one
figure a person looks for first. Read from the stage manifests, so a fully cached run reports as
much as the run that built it (the Prefect summary artifact, ``imagesmith demo``, ``imagesmith status``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage.stage import MANIFEST_NAME, open_stage


def _hit(metrics: list[dict[str, Any]], model: str, task: str, candidates: str, k: int = 5) -> float | None:
    for row in metrics or []:
        if (row.get("model") == model and row.get("task") == task and row.get("candidates") == candidates
                and row.get(f"hit@{k}") is not None):
            return row[f"hit@{k}"]
    return None


def key_figure(manifest: dict[str, Any]) -> str:
    """The headline of a finished stage, from its manifest (empty when it has none)."""
    stage, m = manifest.get("stage", ""), manifest
    if stage in ("sample", "listing", "resize", "crappify", "generated") and m.get("counts"):
        counts = m["counts"]
        if isinstance(counts, dict) and all(isinstance(v, dict) for v in counts.values()):
            written = sum(v.get("written", 0) for v in counts.values())
            rejected = sum(v.get("rejected", 0) for v in counts.values())
            return f"{written} images" + (f", {rejected} rejected" if rejected else "")
        if isinstance(counts, dict):
            return ", ".join(f"{k} {v}" for k, v in counts.items() if isinstance(v, int))
    if stage == "embeddings" and isinstance(m.get("report"), dict):
        r = m["report"]
        parts = [f"{v['total'] - v['unmatched']}/{v['total']} {k.replace('_', ' ')}" for k, v in r.items()
                 if isinstance(v, dict) and "total" in v]
        return f"{m.get('dims')}-d vectors for " + ", ".join(parts)
    if stage in ("superres",) and m.get("evaluation"):
        e = m["evaluation"]
        return f"PSNR {e['psnr_model']:.2f} dB vs bicubic {e['psnr_bicubic']:.2f}"
    if stage == "gan" and m.get("evaluation"):
        e = m["evaluation"]
        steps = [s for s in m.get("critic_steps_per_gen_step") or [] if s is not None]
        return (f"PSNR {e['psnr_gan']:.2f} dB (pretrained {e['psnr_pretrained']:.2f}, bicubic {e['psnr_bicubic']:.2f})"
                + (f"; {steps[-1]:.1f} critic steps per generator step" if steps else "; no generator step yet"))
    if stage == "critic" and m.get("critic_acc") is not None:
        return (f"critic accuracy {m['critic_acc']:.3f} (real {m.get('critic_acc_real', 0):.2f}, "
                f"generated {m.get('critic_acc_fake', 0):.2f})")
    if stage == "devise-features":
        return f"{m.get('backbone')} ({'pretrained' if m.get('pretrained_loaded') else 'random weights'})"
    if stage in ("devise", "devise-finetune"):
        flat = _hit(m.get("metrics"), "devise", "flat", "imagenet-1k")
        zero = _hit(m.get("metrics"), "devise", "zero-shot", "held-out + imagenet-1k")
        parts = [f"hit@5 {flat:.3f} (1k labels)" if flat is not None else "",
                 f"zero-shot hit@5 {zero:.3f} (held-out + 1k)" if zero is not None else ""]
        return ", ".join(p for p in parts if p)
    if stage == "devise-index":
        return f"{m.get('vectors', '?')} images indexed ({str(m.get('kind', '?')).replace('_', ' ')})"
    if stage == "wgan":
        return f"{m.get('generator_steps')} generator steps, critic loss {m.get('final_critic', float('nan')):.4f}"
    if stage == "style":
        loss = m.get("val_loss") if m.get("val_loss") is not None else m.get("final_loss")
        return f"loss {loss:.4f}" if loss is not None else ""
    return ""


def stage_row(family: str, name: str, path: str | Path, since: float | None = None) -> dict[str, Any] | None:
    """One row for a stage directory (None for a folder that is not a finished stage, e.g. a user's
    own dataset). ``since``: the run's start (epoch seconds); a stage completed before it was cached."""
    path = Path(path)
    if not (path / MANIFEST_NAME).is_file():
        return None
    m = open_stage(path).manifest()
    done = m.get("completed_unix")
    state = "built" if since is None or (done is not None and done >= since) else "cached"
    return {"family": family, "stage": name, "state": state,
            "seconds": round(m["build_s"], 1) if state == "built" and m.get("build_s") is not None else None,
            "figure": key_figure(m), "key": path.name[:12], "path": str(path)}


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table (the CLI prints it)."""
    header = ("family", "stage", "state", "time", "result")
    lines = [(r["family"], r["stage"], r["state"], f"{r['seconds']:.0f} s" if r.get("seconds") is not None else "-",
              r.get("figure") or "") for r in rows]
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(4)]
    out = ["  ".join(str(v).ljust(w) for v, w in zip(header[:4], widths)) + "  " + header[4]]
    out += ["  ".join(str(v).ljust(w) for v, w in zip(line[:4], widths)) + "  " + line[4] for line in lines]
    return "\n".join(out)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| family | stage | state | time | result | key |", "|---|---|---|---|---|---|"]
    for r in rows:
        time_s = f"{r['seconds']:.0f} s" if r.get("seconds") is not None else "-"
        lines.append(f"| {r['family']} | {r['stage']} | {r['state']} | {time_s} | {r.get('figure') or ''} | "
                     f"`{r.get('key', '')}` |")
    return "\n".join(lines)


def publish_rows(flow: str, rows: list[dict[str, Any]], title: str | None = None) -> None:
    """Stage rows as the markdown artifact ``<flow>-summary``, headed by how many were built and cached."""
    from prefect.artifacts import create_markdown_artifact

    built = sum(r["state"] == "built" for r in rows)
    create_markdown_artifact(key=f"{flow}-summary", markdown=f"# {title or flow}: {built} stage(s) built, "
                             f"{len(rows) - built} cached\n\n" + markdown_table(rows),
                             description=f"Every stage of this {flow} run: built or cached, time, key figure")


def publish_summary(flow: str, outputs: dict[str, Any], since: float) -> list[dict[str, Any]]:
    """The run's stage table as the markdown artifact ``<flow>-summary`` (every run, cached or not:
    a fully cached run still shows what it stands on); returns the rows."""
    rows = [r for name, path in outputs.items() if isinstance(path, (str, Path))
            for r in [stage_row(flow, name, path, since)] if r]
    publish_rows(flow, rows)
    return rows
