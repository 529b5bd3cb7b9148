"""What each method is: one row per method, and every other module asks this table (SPEC §5).

Methods differ by switches, not by forks of the loop. A row says which passes a method runs and which loss
terms it adds; everything that depends on the method reads it from here: the config's allowed values
(`kava.config`), the batches and the loss step (`kava.objective`), the trainer (DDP's unused parameters, the
refusal of CoT-less data), evaluation's default mode, the diagnostics, `kava ask`'s pass accounting, the
export's settings and the report's row order.

| method  | teacher sequence | student latents    | curriculum (`kava.curriculum`)  | terms                            | eval mode |
|---------|------------------|--------------------|---------------------------------|----------------------------------|-----------|
| cot     | with the CoT     | –                  | –                               | ce_teacher                       | cot       |
| nocot   | without the CoT  | –                  | –                               | ce_teacher (on the answer)       | nocot     |
| icot    | with the CoT     | –                  | CoT tokens removed from the front | ce_teacher (on what remains)   | cot       |
| pccot   | with the CoT     | Jacobi sweeps      | –                               | ce_student, ce_teacher, codi     | latent    |
| codi    | with the CoT     | sequential latents | –                               | ce_student, ce_teacher, codi     | latent    |
| coconut | no teacher pass  | sequential latents | first s steps -> s·c thoughts   | ce_student (remaining CoT, answer) | latent  |
| kava    | with the CoT     | Jacobi sweeps      | –                               | ce_student, ce_teacher, codi, kv | latent    |

Adding a method that these switches describe is one row in `SPECS` (plus its test and a line in
docs/method.md); see docs/method.md §6 "Adding a method".
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("latent", "cot", "nocot")
"""Inference modes (`kava.decode.generate`): latent reasoning, written CoT, or the answer directly."""

STUDENT_MODES = ("jacobi", "sequential")
"""How a student produces its M latents (`kava.model.reasoner.LatentReasoner.student_forward`)."""
CURRICULA = ("icot", "coconut")
"""Training-time schedules that rewrite each step's examples (`kava.curriculum`)."""


@dataclass(frozen=True)
class MethodSpec:
    """One method: which passes it runs and which loss terms it adds."""

    name: str
    teacher_cot: bool  # the teacher sequence holds the CoT (its CE covers CoT, prompt and answer)
    student: str | None  # None (no latent student) | "jacobi" | "sequential"
    codi: bool  # L_CODI: student vs teacher hidden states at the answer position
    kv: bool  # L_KV: the student's latent KV vs the teacher's compressed CoT KV (`kava.objective.kv_targets`)
    teacher: bool = True  # a teacher pass runs, with its CE term (Coconut trains the student sequence only)
    title: str = ""  # what the method is, in a few words (the model card's sentence)
    curriculum: str | None = None  # None | "icot" | "coconut": `kava.curriculum` rewrites each step's examples

    def __post_init__(self):
        if self.student is not None and self.student not in STUDENT_MODES:
            raise ValueError(f"{self.name}: student {self.student!r}; allowed values: None, {', '.join(STUDENT_MODES)}")
        if (self.codi or self.kv) and (self.student is None or not self.teacher):
            raise ValueError(f"{self.name}: the codi and kv terms compare a latent student with its teacher")
        if not self.teacher and self.student is None:
            raise ValueError(f"{self.name}: a method without a teacher pass needs a latent student")
        if self.curriculum is not None and self.curriculum not in CURRICULA:
            raise ValueError(f"{self.name}: curriculum {self.curriculum!r}; allowed values: None, {', '.join(CURRICULA)}")

    @property
    def latent(self) -> bool:
        """Whether the method has a latent student (and so a latent inference mode)."""
        return self.student is not None

    @property
    def student_mode(self) -> str:
        """How the method's latents are produced at inference (a method without a student: "jacobi", unused)."""
        return self.student or "jacobi"

    @property
    def student_cot(self) -> bool:
        """The student's answer block holds (and learns) the written CoT steps its latents have not replaced
        yet: Coconut's curriculum (`kava.data.format.build_student_batch(with_cot=True)`)."""
        return self.curriculum == "coconut"

    @property
    def eval_mode(self) -> str:
        """The mode `kava eval`, `kava ask` and `kava.load(...).generate` use by default."""
        if self.latent:
            return "latent"
        # iCoT generates freely from the question, as the official evaluation does: whatever CoT it still writes
        # is generated (and counted in its forward passes); once internalised it writes the answer prompt at once
        return "cot" if self.teacher_cot else "nocot"

    @property
    def terms(self) -> tuple[str, ...]:
        """The loss terms, in the order `loss_step` logs them."""
        return ("ce_teacher",) * self.teacher + ("ce_student",) * self.latent + ("codi",) * self.codi + ("kv",) * self.kv


SPECS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("cot", teacher_cot=True, student=None, codi=False, kv=False,
               title="CoT: supervised fine-tuning on the written chain of thought"),
    MethodSpec("nocot", teacher_cot=False, student=None, codi=False, kv=False,
               title="No-CoT: supervised fine-tuning on the answer alone"),
    MethodSpec("icot", teacher_cot=True, student=None, codi=False, kv=False, curriculum="icot",
               title="iCoT: stepwise internalization, the CoT's tokens removed from the front as training goes on"),
    MethodSpec("pccot", teacher_cot=True, student="jacobi", codi=True, kv=False,
               title="PCCoT: parallel continuous chain of thought (Jacobi sweeps over latent tokens)"),
    MethodSpec("codi", teacher_cot=True, student="sequential", codi=True, kv=False,
               title="CODI: latent reasoning by self-distillation of the teacher's hidden state"),
    MethodSpec("coconut", teacher_cot=True, student="sequential", codi=False, kv=False, teacher=False,
               curriculum="coconut",
               title="Coconut: continuous thoughts, the CoT's steps replaced stage by stage by hidden states fed back"),
    MethodSpec("kava", teacher_cot=True, student="jacobi", codi=True, kv=True,
               title="KaVa: latent reasoning distilled from a compressed KV-cache of the CoT teacher"),
)}

METHODS: tuple[str, ...] = tuple(SPECS)
LATENT_METHODS: tuple[str, ...] = tuple(m for m, s in SPECS.items() if s.latent)
KV_METHODS: tuple[str, ...] = tuple(m for m, s in SPECS.items() if s.kv)


def spec_of(method: str) -> MethodSpec:
    """The row of `method`; a ValueError listing the known methods otherwise."""
    try:
        return SPECS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; allowed values: {', '.join(METHODS)}") from None


def report_order() -> tuple[str, ...]:
    """The order of methods in tables: answer-only baselines, then written CoT, then the latent methods (each
    group in table order)."""
    return tuple(sorted(METHODS, key=lambda m: (SPECS[m].latent, SPECS[m].teacher_cot,
                                                not SPECS[m].latent and SPECS[m].curriculum is not None)))
