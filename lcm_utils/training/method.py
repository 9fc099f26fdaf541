"""The script interface: what full distillation and LCM-LoRA each define, and nothing else.

A script subclasses `DistillationMethod`; the shared loop (lcm_utils.training) calls only these methods, so it never
asks which method, family or objective it runs.
"""

from ..objectives import make_objective
from ..tensors import in_dtype


class DistillationMethod:
    """What a script defines: how the student and target are built, what trains, how results are saved."""

    name = "base"
    card_kind = ""  # the model card's title after the objective's name: "-distilled", "-LoRA"
    card_tags = ()  # the model card's tags for this kind of student
    foreign_flags = ()  # the other script's flags, rejected with a pointer to it
    foreign_script = None
    validation_guidance_text = ""  # the default validation guidance, in words, for --help

    @staticmethod
    def add_flags(parser):
        """Flags only this method takes."""

    def check_args(self, args):
        """Reject flag values that make no sense for this method (ConfigError)."""

    def setup(self, teacher, args, weight_dtype):
        """What every method keeps (the family for pipelines and weight files, the objective of --objective for the
        loss and the sampler, the flags for the model card), then the method's own build."""
        self.family, self.args = teacher.family, args
        self.objective = make_objective(args.objective, args.num_phases, args.tcd_gamma)
        self.build(teacher, args, weight_dtype)

    def teacher_load_dtype(self, args, weight_dtype):
        """The dtype the teacher's denoiser is moved to the device in (fp32: the full student copies its weights)."""
        import torch

        return torch.float32

    def build(self, teacher, args, weight_dtype):
        """Set self.student (its trainable weights fp32) and the target; cast the teacher per --cast_teacher_unet."""
        raise NotImplementedError

    def denoisers(self):
        """Every denoiser the run holds (for attention backends, memory format, compilation)."""
        raise NotImplementedError

    def inputs(self, dtype, z, cond):
        """(z, cond) for a denoiser whose weights are in `dtype` (see tensors.in_dtype); the family's fp32
        conditions stay fp32."""
        return in_dtype(dtype, z, cond, self.family.fp32_conditions)

    def trainable_parameters(self):
        return [p for p in self.student.parameters() if p.requires_grad]

    def checkpoint_bytes(self):
        """About what a checkpoint writes: the trained weights, their EMA target and AdamW's two moments, in fp32."""
        return 4 * 4 * sum(p.numel() for p in self.trainable_parameters())

    def student_forward(self, z, t, cond, w):
        raise NotImplementedError

    def teacher_forward(self, z, t, cond):
        raise NotImplementedError

    def target_forward(self, z, t, cond, w):
        raise NotImplementedError

    def discriminator_backbone(self):
        """The module teacher_forward runs, whose blocks the adversarial term's discriminator reads."""
        raise NotImplementedError

    def update_target(self, gate=None):
        """Called after every optimizer step (EMA); gate: a device scalar, 0 when the step's update was skipped."""

    def check_engine(self, args, acc):
        """Before any model loads: reject what this method cannot do under the run's engine (FSDP, ZeRO-3)."""

    def shard(self):
        """Under FSDP, after accelerate sharded the student: shard what must match it (the EMA target)."""

    def snapshot(self, student_only=False):
        """The full weights that save_state/export write, {part: {name: tensor}}. Called on every rank (a
        sharded student is gathered); only the main process's result holds tensors."""
        raise NotImplementedError

    def save_state(self, folder, weights):
        """Write a snapshot() into a checkpoint folder (main process)."""
        raise NotImplementedError

    def load_state(self, folder):
        """Every rank reads the checkpoint's weights into its student and target."""
        raise NotImplementedError

    def export(self, output_dir, weights):
        """Write the final weights of a snapshot() (main process); returns the model card's usage section."""
        raise NotImplementedError

    def validation_pipeline(self, folder, teacher, args, device, weights):
        """Save the student of a snapshot(student_only=True) to folder and load it into a fresh stock pipeline,
        the way a user would (main process)."""
        raise NotImplementedError

    def default_validation_guidance(self, args):
        """guidance_scale of the validation grid when --validation_guidance_scale is unset."""
        raise NotImplementedError

    def reference_guidance(self, args):
        """guidance_scale of the teacher's samples that validation measures the student against."""
        raise NotImplementedError
