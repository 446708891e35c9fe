"""The plan as `tunelab plan` prints it: the device, the data, one line per strategy, the configured strategy's
memory and time, its share of pre-training, and the recommendation."""

from __future__ import annotations

from tunelab.plan.run import VALIDATED_ERROR, PlanResult


def duration(seconds: float) -> str:
    """A time a person reads at a glance: seconds, minutes or hours."""
    if seconds < 60:
        return f"{seconds:.2g}s" if seconds < 10 else f"{seconds:.0f}s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def pretraining_share(result: PlanResult, strategy: str) -> float | None:
    """A strategy's training FLOPs as a share of the base model's pre-training (6 x parameters x pre-training
    tokens); None when the pre-training tokens are unknown."""
    if not result.pretraining:
        return None
    e = result.estimates[strategy]
    return e.flops / (6 * e.total_params * result.pretraining[0])


def strategy_table(result: PlanResult) -> list[str]:
    """The header and one line per strategy (the configured one marked *)."""
    head = f"{'strategy':<12}{'trainable':>14}{'share':>9}{'adapter MiB':>12}{'memory GiB':>11}{'fits':>6}" \
           f"{'TFLOP':>10}{'time':>10}{'of pre-training':>17}"
    lines = [head, "-" * len(head)]
    for name, e in result.estimates.items():
        share = pretraining_share(result, name)
        pre = f"{100 * share:.2g}%" if share is not None else "-"
        mark = "*" if name == result.config_strategy else " "
        fits = "yes" if e.memory_bytes["total"] <= result.device.memory_bytes else "NO"
        lines.append(f"{mark}{name:<11}{e.trainable_params:>14,}{100 * e.trainable_params / e.total_params:>8.3g}%"
                     f"{e.adapter_bytes / 2**20:>12.2f}{e.memory_bytes['total'] / 2**30:>11.3f}{fits:>6}"
                     f"{e.flops / 1e12:>10.3g}{duration(e.seconds):>10}{pre:>17}")
    return lines


def configured_lines(result: PlanResult) -> list[str]:
    """The configured strategy's memory, time, what would make it fit, and its share of pre-training."""
    name, device = result.config_strategy, result.device
    chosen = result.estimates[name]
    lines = [f"memory of {name}: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in chosen.memory_bytes.items()),
             f"time of {name}: {chosen.step_seconds:.3g} s per step ({chosen.time_source})"]
    if chosen.fit_changes:
        lines.append(f"{name} does not fit {device.name} ({chosen.memory_bytes['total'] / 2**30:.1f} of "
                     f"{device.memory_bytes / 2**30:.0f} GiB); to fit, change one of:\n"
                     + "\n".join(f"  - {c}" for c in chosen.fit_changes))
    share = pretraining_share(result, name)
    if share is not None:
        lines.append(f"this fine-tune ({name}) costs {100 * share:.2g}% of pre-training "
                     f"({result.pretraining[0]:.3g} tokens: {result.pretraining[1]})")
    return lines


def plan_text(result: PlanResult) -> str:
    """Everything `tunelab plan` prints for one device."""
    device, d, a = result.device, result.data, result.advice
    lines = [f"device: {device.name}, {device.memory_bytes / 2**30:.0f} GiB, {device.peak_flops / 1e12:.3g} TFLOP/s "
             f"peak, MFU {device.mfu:.0%} ({device.source})",
             f"data: {d.num_examples:,} examples, {d.num_tokens:,} tokens, {d.num_label_tokens:,} target tokens "
             f"(mean length {d.mean_length:.0f})"]
    lines += strategy_table(result) + configured_lines(result)
    lines += [f"estimate error: {VALIDATED_ERROR}", f"recommendation: {a.strategy} {a.settings}\n  {a.reasons}"]
    return "\n".join(lines)
