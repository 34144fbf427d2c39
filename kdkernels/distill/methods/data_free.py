"""Data-free distillation: the student never sees the training data; a generator, trained in the same stage against the
frozen teacher, makes its inputs (a stage with a :class:`~kdkernels.distill.sources.GeneratorSource` and two
optimisers). The run's test split still evaluates the student."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels._validation import Checks
from kdkernels.distill.methods._common import single_stage
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.optimisers import Optimiser
from kdkernels.distill.recipe import Recipe, Setup, Stage, feature_points
from kdkernels.distill.registry import register
from kdkernels.distill.sources import GeneratorSource, SyntheticData, TensorSource
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm, Term
from kdkernels.distill.views import HorizontalFlip, RandomCrop, View

DAFL_PAPER = "Chen, Wang, Xu, Yang, Liu, Shi, Xu, Xu, Tian. Data-Free Learning of Student Networks. ICCV 2019"


class DAFLGenerator(nn.Module):
    """The DAFL generator (huawei-noah/Efficient-Computing ``Data-Efficient-Model-Compression/DAFL/DAFL-train.py``,
    ``Generator``): ``Linear(latent, 128·(s/4)²)`` → BN(128) → ×2 nearest → Conv3×3(128→128), BN(128, eps=0.8),
    LeakyReLU(0.2) → ×2 → Conv3×3(128→64), BN(64, eps=0.8), LeakyReLU(0.2), Conv3×3(64→channels), Tanh,
    BN(channels, affine=False); images ``[B, channels, s, s]`` (``s`` a multiple of 4)."""

    def __init__(self, latent_dim: int = 100, channels: int = 1, image_size: int = 32):
        super().__init__()
        self.init_size = image_size // 4
        self.l1 = nn.Sequential(nn.Linear(latent_dim, 128 * self.init_size ** 2))
        self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(128))
        self.conv_blocks1 = nn.Sequential(nn.Conv2d(128, 128, 3, stride=1, padding=1), nn.BatchNorm2d(128, 0.8),
                                          nn.LeakyReLU(0.2, inplace=True))
        self.conv_blocks2 = nn.Sequential(nn.Conv2d(128, 64, 3, stride=1, padding=1), nn.BatchNorm2d(64, 0.8),
                                          nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(64, channels, 3, stride=1,
                                                                                     padding=1),
                                          nn.Tanh(), nn.BatchNorm2d(channels, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.l1(z).view(z.shape[0], 128, self.init_size, self.init_size)
        img = F.interpolate(self.conv_blocks0(out), scale_factor=2)
        img = F.interpolate(self.conv_blocks1(img), scale_factor=2)
        return self.conv_blocks2(img)


def dafl_part(teacher: torch.Tensor, features: torch.Tensor, *, part: int) -> torch.Tensor:
    """One unweighted part of :func:`kdkernels.dafl_generator_loss` (0: one-hot, 1: information entropy,
    2: activation), so that each is its own term (weighted and logged separately)."""
    return kdkernels.dafl_generator_loss(teacher, features, return_parts=True)[part]


def _kd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return kdkernels.kd_loss(student, teacher.detach(), 1.0)


@register("dafl", category="data-free", paper=DAFL_PAPER, presets={
    "mnist": {"image_shape": (1, 32, 32), "batch_size": 512, "steps_per_epoch": 120, "generator_lr_scale": 100.0},
    "cifar10": {"image_shape": (3, 32, 32), "batch_size": 1024, "steps_per_epoch": 120, "latent_dim": 1000,
                "generator_lr_scale": 0.2, "one_hot_weight": 0.05, "information_entropy_weight": 5.0,
                "activation_weight": 0.01},
    "cifar100": {"image_shape": (3, 32, 32), "batch_size": 1024, "steps_per_epoch": 120, "latent_dim": 1000,
                 "generator_lr_scale": 0.2, "one_hot_weight": 0.5, "information_entropy_weight": 20.0,
                 "activation_weight": 0.1}})
def dafl(setup: Setup, one_hot_weight: float = 1.0, information_entropy_weight: float = 5.0,
         activation_weight: float = 0.1, kd_weight: float = 1.0, latent_dim: int = 100,
         image_shape: tuple = (1, 8, 8), batch_size: int | None = None, steps_per_epoch: int | None = None,
         generator_lr_scale: float = 1.0, teacher_layer: str | None = None) -> Recipe:
    """DAFL, data-free KD: a generator G minimises ``oh·CE(z_t, argmax z_t) + ie·Σ_c p̄_c log10 p̄_c − a·mean|f_t|``
    (z_t = teacher(G(z)), p̄ = mean_b softmax(z_t), f_t the teacher's features), while the student minimises
    ``kd·KL(p_t ‖ p_s)`` (T = 1, batchmean) on the same generated images; z ~ N(0, I).

    Chen et al. (ICCV 2019); official code huawei-noah/Efficient-Computing
    ``Data-Efficient-Model-Compression/DAFL/DAFL-train.py``: per iteration one noise batch, ``loss_one_hot·oh +
    loss_information_entropy·ie + loss_activation·a`` for G (teacher in eval mode, gradients through it into G),
    ``kdloss(net(gen_imgs.detach()), outputs_T.detach())`` (KL summed / B) for the student, one backward of the sum
    and both optimisers stepping: here a stage with a :class:`~kdkernels.distill.sources.GeneratorSource` and the
    optimisers ``"generator"`` (G: one_hot, information_entropy, activation, at ``generator_lr_scale`` × the
    stage's rate) and ``"student"`` (kd), ``step_plan="simultaneous"`` (each optimiser the gradient of its own
    terms: the same as the official single backward, since the student's loss reads detached images and teacher
    outputs). G is :class:`DAFLGenerator`. Defaults are the official MNIST ones (``--oh 1 --ie 5 --a 0.1``,
    latent 100); f_t is the teacher's classifier input (``kd_points.embedding``; the official ResNet returns the pooled
    feature, its LeNet-5 the conv3 output before the hidden fc1). Deviations of the default preset, for the bundled
    8×8 digits: ``image_shape (1, 8, 8)``, the run's batch size and epoch length (``batch_size``/``steps_per_epoch``
    ``None``) and one learning rate for both (the trainer has one optimiser type; officially Adam with lr_G 0.2,
    lr_S 2e-3 on MNIST, ratio 100). Presets ``mnist``, ``cifar10``, ``cifar100`` hold the official README values
    (batch 512 / 1024, 120 iterations per epoch, latent 1000 and ``--oh/--ie/--a`` on CIFAR, lr ratio lr_G/lr_S).
    """
    check = Checks("dafl")
    weights = {name: check.real(name, value, minimum=0.0) for name, value in (
        ("one_hot_weight", one_hot_weight), ("information_entropy_weight", information_entropy_weight),
        ("activation_weight", activation_weight), ("kd_weight", kd_weight))}
    latent_dim = check.integer("latent_dim", latent_dim, minimum=1)
    if isinstance(image_shape, (str, bytes)) or not isinstance(image_shape, (tuple, list)) or len(image_shape) != 3:
        check.type_error("image_shape", "a (channels, height, width) tuple", image_shape)
    channels, height, width = (check.integer("image_shape", size, minimum=1) for size in image_shape)
    if height != width or height % 4:
        check.value_error("image_shape", "must be square with a side that is a multiple of 4 (the generator "
                                         "up-samples twice by 2)", repr(tuple(image_shape)))
    generator_lr_scale = check.real("generator_lr_scale", generator_lr_scale, positive=True)
    teacher = setup.require_teacher("dafl")
    if teacher_layer is None:
        teacher_layer = feature_points(teacher).embedding
    generator_reads = ("teacher", f"teacher:{teacher_layer}")
    terms = [FunctionTerm("one_hot", dafl_part, generator_reads, weights["one_hot_weight"], part=0),
             FunctionTerm("information_entropy", dafl_part, generator_reads, weights["information_entropy_weight"],
                          part=1),
             FunctionTerm("activation", dafl_part, generator_reads, weights["activation_weight"], part=2),
             FunctionTerm("kd", _kd, ("student", "teacher"), weights["kd_weight"])]
    models = {"student": setup.student, "teacher": teacher,
              "generator": DAFLGenerator(latent_dim, channels, height)}
    distiller = Distiller(models, terms, trainable=("student", "generator"))
    optimisers = {"generator": Optimiser(models=("generator",), terms=("one_hot", "information_entropy",
                                                                        "activation"),
                                         lr_scale=generator_lr_scale),
                  "student": Optimiser(models=("student",), terms=("kd",))}
    source = GeneratorSource("generator", batch_size=batch_size, noise_dim=latent_dim,
                             steps_per_epoch=steps_per_epoch)
    return single_stage("dafl", distiller, source=source, optimisers=optimisers, step_plan="simultaneous")


# --------------------------------------------------------------------------------------------------------- DFAD

DFAD_PAPER = "Fang, Song, Song, Sun. Data-Free Adversarial Distillation. arXiv:1912.11006, 2019"


class DFADGenerator(nn.Module):
    """DFAD's generator (VainF/Data-Free-Adversarial-Distillation ``network/gan.py``, ``GeneratorA``):
    ``Linear(latent, 2·ngf·(s/4)²)`` → BN(2ngf) → ×2 nearest → Conv3×3(2ngf→2ngf), BN, LeakyReLU(0.2) → ×2 →
    Conv3×3(2ngf→ngf), BN, LeakyReLU(0.2), Conv3×3(ngf→channels), Tanh, BN(channels, affine=False); images
    ``[B, channels, s, s]`` (``s`` a multiple of 4). The noise may be ``[B, latent]`` or ``[B, latent, 1, 1]``. The
    same layout as :class:`DAFLGenerator` with PyTorch's default BN eps (DAFL's inner BNs use eps 0.8)."""

    def __init__(self, latent_dim: int = 100, channels: int = 1, image_size: int = 32, width: int = 64):
        super().__init__()
        self.init_size = image_size // 4
        self.l1 = nn.Sequential(nn.Linear(latent_dim, 2 * width * self.init_size ** 2))
        self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(2 * width))
        self.conv_blocks1 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, stride=1, padding=1),
                                          nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2, inplace=True))
        self.conv_blocks2 = nn.Sequential(nn.Conv2d(2 * width, width, 3, stride=1, padding=1), nn.BatchNorm2d(width),
                                          nn.LeakyReLU(0.2, inplace=True),
                                          nn.Conv2d(width, channels, 3, stride=1, padding=1), nn.Tanh(),
                                          nn.BatchNorm2d(channels, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.l1(z.reshape(z.shape[0], -1)).view(z.shape[0], -1, self.init_size, self.init_size)
        img = F.interpolate(self.conv_blocks0(out), scale_factor=2)
        img = F.interpolate(self.conv_blocks1(img), scale_factor=2)
        return self.conv_blocks2(img)


def dfad_generator_objective(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The generator's loss ``−mean |z_s − z_t|`` (it maximises the discrepancy; gradients through both networks)."""
    return -kdkernels.dfad_loss(student, teacher)


def _dfad_student(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return kdkernels.dfad_loss(student, teacher.detach())


def _image_shape(check: Checks, image_shape) -> tuple[int, int, int]:
    if isinstance(image_shape, (str, bytes)) or not isinstance(image_shape, (tuple, list)) or len(image_shape) != 3:
        check.type_error("image_shape", "a (channels, height, width) tuple", image_shape)
    channels, height, width = (check.integer("image_shape", size, minimum=1) for size in image_shape)
    return channels, height, width


@register("dfad", category="data-free", paper=DFAD_PAPER, presets={
    "digits": {"steps_per_epoch": 60},
    "mnist": {"image_shape": (1, 32, 32), "batch_size": 512, "steps_per_epoch": 300, "generator_lr_scale": 0.1},
    "cifar10": {"image_shape": (3, 32, 32), "batch_size": 256, "steps_per_epoch": 300, "latent_dim": 256,
                "generator_lr_scale": 0.01}})
def dfad(setup: Setup, student_steps: int = 5, latent_dim: int = 100, generator_width: int = 64,
         image_shape: tuple = (1, 8, 8), batch_size: int | None = None, steps_per_epoch: int | None = None,
         generator_lr_scale: float = 1.0) -> Recipe:
    """DFAD, data-free adversarial distillation: the student minimises the teacher–student discrepancy
    ``mean_{b,c} |z_s − z_t|`` (logit MAE, :func:`kdkernels.dfad_loss`) on a generator's images, the generator G
    maximises it (``loss_G = −mean |z_s − z_t|``, gradients through the frozen teacher and the student); z ~ N(0, I).

    Fang, Song, Song and Sun (2019); official code VainF/Data-Free-Adversarial-Distillation (commit c161591)
    ``DFAD_mnist.py``/``DFAD_cifar.py`` ``train``: each iteration 5 student steps (each a new noise batch, the images
    detached, ``F.l1_loss(s_logit, t_logit.detach())``), then one generator step on a new noise batch
    (``−F.l1_loss(s_logit, t_logit)``); teacher in eval mode, student and G in train mode throughout. Here: a stage
    with a :class:`~kdkernels.distill.sources.GeneratorSource` (G = :class:`DFADGenerator`, ``network/gan.py``
    ``GeneratorA``, ngf ``generator_width`` 64) and two optimisers, ``"student"`` (term ``dfad``) and
    ``"generator"`` (term ``dfad_generator``, at ``generator_lr_scale`` × the stage's rate), with the step plan
    ``{"student": student_steps, "generator": 1}`` (each turn its own noise batch and forward, as officially; each
    optimiser differentiates its own term with respect to its own parameters, the same as the official detaching).
    The student never reads the training set; the run's test split evaluates it. Defaults: official 5 student steps
    per generator step, latent (nz) 100 (MNIST). Deviations of the default preset, for the bundled 8×8 digits:
    ``image_shape (1, 8, 8)``, the run's batch size and epoch length and one optimiser type and learning rate for both
    (officially SGD lr 0.01, momentum 0.9, wd 1e-4 for S and Adam lr 1e-3 for G on MNIST; SGD 0.1 / Adam 1e-3 on
    CIFAR). Presets ``mnist`` / ``cifar10`` hold the official values (batch 512 / 256, 50 iterations of 6 steps per
    epoch, nz 100 / 256, lr_G/lr_S 0.1 / 0.01); ``digits`` (chosen here) makes the demo's short epochs 60 steps (10
    iterations; by default an epoch is as long as one over the 300 training images, 5 steps, too few for the
    generator game: 16.5 % vs 60.9 % on the digits demo). Logged: both terms every turn (each is computed every
    turn).
    """
    check = Checks("dfad")
    student_steps = check.integer("student_steps", student_steps, minimum=1)
    latent_dim = check.integer("latent_dim", latent_dim, minimum=1)
    generator_width = check.integer("generator_width", generator_width, minimum=1)
    channels, height, width = _image_shape(check, image_shape)
    if height != width or height % 4:
        check.value_error("image_shape", "must be square with a side that is a multiple of 4 (the generator "
                                         "up-samples twice by 2)", repr(tuple(image_shape)))
    generator_lr_scale = check.real("generator_lr_scale", generator_lr_scale, positive=True)
    teacher = setup.require_teacher("dfad")
    terms = [FunctionTerm("dfad", _dfad_student, ("student", "teacher")),
             FunctionTerm("dfad_generator", dfad_generator_objective, ("student", "teacher"))]
    models = {"student": setup.student, "teacher": teacher,
              "generator": DFADGenerator(latent_dim, channels, height, generator_width)}
    distiller = Distiller(models, terms, trainable=("student", "generator"))
    optimisers = {"student": Optimiser(models=("student",), terms=("dfad",)),
                  "generator": Optimiser(models=("generator",), terms=("dfad_generator",),
                                         lr_scale=generator_lr_scale)}
    source = GeneratorSource("generator", batch_size=batch_size, noise_dim=latent_dim,
                             steps_per_epoch=steps_per_epoch)
    return single_stage("dfad", distiller, source=source, optimisers=optimisers,
                        step_plan={"student": student_steps, "generator": 1})


# ------------------------------------------------------------------------------------------------- DeepInversion

DEEPINVERSION_PAPER = ("Yin, Molchanov, Li, Alvarez, Mallya, Hoiem, Jha, Kautz. Dreaming to Distill: Data-free "
                       "Knowledge Transfer via DeepInversion. CVPR 2020")
DEEPINVERSION_APPROXIMATION = (
    "approximation of NVlabs/DeepInversion: the inversion losses are the official ones, but the images are optimised "
    "by the run's optimiser (one type for the run; officially Adam, lr 0.2, betas (0.5, 0.9)) with the run's "
    "schedule and weight decay, the jitter is a per-sample zero-padded random shift (officially one torch.roll of "
    "the whole batch) and the flip per sample, the images are not clipped and the last iterate is kept (officially "
    "the lowest-loss iterate); the Adaptive DeepInversion student is the untrained student, frozen (officially "
    "rounds of generation and student training); the KD stage (Hinton KD on the synthetic set) is not in the "
    "official code")


class BatchNormStatisticsTerm(Term):
    """DeepInversion's ``R_feature`` (:func:`kdkernels.deepinversion_feature_loss`) over the inputs of the model's
    batch-norm layers: reads their taps (``"teacher:<bn>/input"``) and the layers' running statistics (the layers
    are referenced, not owned: they stay the teacher's)."""

    def __init__(self, model: str, layers: list[tuple[str, nn.Module]], weight: float, first_bn_multiplier: float):
        super().__init__("r_feature", tuple(f"{model}:{name}/input" for name, _ in layers), weight)
        self._layers = [module for _, module in layers]
        self.first_bn_multiplier = first_bn_multiplier

    def loss(self, *features, context):
        return kdkernels.deepinversion_feature_loss(list(features), [m.running_mean for m in self._layers],
                                                    [m.running_var for m in self._layers],
                                                    first_bn_multiplier=self.first_bn_multiplier)


@register("deepinversion", category="data-free", paper=DEEPINVERSION_PAPER,
          approximation=DEEPINVERSION_APPROXIMATION, presets={
              "digits": {"num_images": 500, "inversion_steps": 500, "inversion_lr_scale": 10.0,
                         "r_feature": 10.0, "first_bn_multiplier": 1.0},
              "cifar10": {"image_shape": (3, 32, 32), "num_images": 256, "inversion_batch_size": 256,
                          "inversion_steps": 2000, "r_feature": 100.0, "first_bn_multiplier": 1.0,
                          "tv_l2": 2.5e-5, "l2": 0.0, "jitter": 2}})
def deepinversion(setup: Setup, r_feature: float = 0.05, first_bn_multiplier: float = 10.0, tv_l1: float = 0.0,
                  tv_l2: float = 1e-4, l2: float = 1e-5, main_loss_multiplier: float = 1.0, adi_scale: float = 0.0,
                  adi_temperature: float = 3.0, jitter: int = 1, flip: bool = False, num_images: int = 256,
                  inversion_batch_size: int | None = None, inversion_steps: int | None = None,
                  inversion_epochs: int = 1,
                  inversion_lr_scale: float = 1.0, image_shape: tuple = (1, 8, 8), kd_weight: float = 1.0,
                  kd_temperature: float = 4.0) -> Recipe:
    """DeepInversion: synthesise images x (from noise, with fixed labels y) against the frozen teacher by
    minimising ``main·CE(t(x̃), y) + r_feature·Σ_l s_l(‖σ²_l − σ²_BN,l‖₂ + ‖μ_l − μ_BN,l‖₂) + tv_l2·Σ_k‖d_k(x̃)‖₂
    + tv_l1·Σ_k mean|d_k(x̃)| + l2·mean_b‖x̃_b‖₂ [+ adi·(1 − JS(p_s, p_t))]`` (x̃ the jittered images, μ_l/σ²_l the
    batch statistics at the input of the teacher's l-th BatchNorm2d, s_0 = first_bn_multiplier), then distil the
    student on the synthesised set with ``kd·T²·KL(p_t ‖ p_s)``; the student never reads a training image.

    Yin et al. (CVPR 2020); official code NVlabs/DeepInversion (commit 2413af1) ``deepinversion.py``
    (``DeepInversionFeatureHook``, ``get_image_prior_losses``, ``DeepInversionClass.get_images``: the losses,
    :func:`kdkernels.deepinversion_feature_loss`, :func:`kdkernels.deepinversion_prior_loss`,
    :func:`kdkernels.adi_competition_loss` with the Adaptive DeepInversion competition ``adi_scale`` off by default)
    and ``imagenet_inversion.py`` (defaults: r_feature 0.05, first_bn_multiplier 10, tv_l1 0, tv_l2 1e-4, l2 1e-5,
    main_loss_multiplier 1, adi_scale 0, no flip; teacher in eval mode). Recipe: stage ``"invert"`` trains a
    :class:`~kdkernels.distill.sources.SyntheticData` of ``num_images`` images (N(0, 1) initialised, labels
    ``i mod classes``: balanced columns as ``cifar10/deepinversion_cifar10.py``) through a
    :class:`~kdkernels.distill.sources.TensorSource` (``inversion_batch_size`` images per step, default all of them:
    one jointly optimised batch as officially) for ``inversion_epochs`` × ``inversion_steps`` steps (default an
    epoch of the run's training set; officially 2000 iterations per batch, preset ``cifar10``) at
    ``inversion_lr_scale`` × the run's rate; views jitter (a random shift of up to ``jitter`` pixels, default 1: the
    official 30 of 224 scaled to 8 pixels) and, with ``flip``, mirror the images the teacher reads. Stage
    ``"distil"`` trains the student by Hinton KD (T ``kd_temperature`` 4, ``kd_weight`` 1) on the frozen synthetic
    set for the run's epochs. Presets: ``cifar10`` (``cifar10/deepinversion_cifar10.py``: 256 images, 2000
    iterations, r_feature 100, no first-layer scale, tv_l2 2.5e-5, l2 0, jitter 2) and ``digits``, chosen here for
    the bundled 8×8 digits and the run's SGD (the official Adam is scale-free, SGD is not): 500 images in one batch,
    500 steps at 10× the run's rate, r_feature 10 without the first-layer scale (the digits teacher has 6 BN layers,
    ResNet-50 53: at 0.05 the statistics barely constrain the images). Digits demo, 1 seed, 30 epochs: default
    weights with 500 images / batches of 250 / 500 steps at 2× / 10× / 100× the rate 34.7 / 49.0 / 20.0 %;
    r_feature 1 / 10 / 100 at 10×: 61.8 / 71.4 / 65.5 %; r_feature 10 with all 500 images per batch (the preset):
    75.1 %. See ``approximation`` for the deviations from the official code.
    """
    check = Checks("deepinversion")
    weights = {name: check.real(name, value, minimum=0.0) for name, value in (
        ("r_feature", r_feature), ("tv_l1", tv_l1), ("tv_l2", tv_l2), ("l2", l2),
        ("main_loss_multiplier", main_loss_multiplier), ("adi_scale", adi_scale), ("kd_weight", kd_weight))}
    first_bn_multiplier = check.real("first_bn_multiplier", first_bn_multiplier, minimum=0.0)
    adi_temperature = check.temperature(adi_temperature, "adi_temperature")
    kd_temperature = check.temperature(kd_temperature, "kd_temperature")
    jitter = check.integer("jitter", jitter, minimum=0)
    flip = check.flag("flip", flip)
    num_images = check.integer("num_images", num_images, minimum=1)
    inversion_batch_size = num_images if inversion_batch_size is None \
        else check.integer("inversion_batch_size", inversion_batch_size, minimum=1, maximum=num_images)
    if inversion_steps is not None:
        inversion_steps = check.integer("inversion_steps", inversion_steps, minimum=1)
    inversion_epochs = check.integer("inversion_epochs", inversion_epochs, minimum=1)
    inversion_lr_scale = check.real("inversion_lr_scale", inversion_lr_scale, positive=True)
    channels, height, width = _image_shape(check, image_shape)
    teacher = setup.require_teacher("deepinversion")
    layers = [(name, module) for name, module in teacher.named_modules() if isinstance(module, nn.BatchNorm2d)]
    if not layers:
        raise ValueError("deepinversion: the teacher has no BatchNorm2d layer (R_feature matches their running "
                         "statistics)")
    images = SyntheticData(torch.randn(num_images, channels, height, width),
                           torch.arange(num_images) % setup.num_classes)
    terms: list[Term] = [CrossEntropyTerm("teacher", weights["main_loss_multiplier"]),
                         BatchNormStatisticsTerm("teacher", layers, weights["r_feature"], first_bn_multiplier),
                         FunctionTerm("prior", kdkernels.deepinversion_prior_loss, ("input",), tv_l1=weights["tv_l1"],
                                      tv_l2=weights["tv_l2"], l2=weights["l2"])]
    models = {"teacher": teacher, "synthetic": images}
    if weights["adi_scale"] > 0:
        models["student"] = setup.student
        terms.append(FunctionTerm("adi", kdkernels.adi_competition_loss, ("student", "teacher"),
                                  weights["adi_scale"], temperature=adi_temperature))
    views = ([View("input", "input", RandomCrop(padding=jitter))] if jitter else []) \
        + ([View("input", "input", HorizontalFlip())] if flip else [])
    invert = Stage("invert", Distiller(models, terms, trainable=("synthetic",), evaluate=("teacher",), views=views),
                   epochs=inversion_epochs, lr_scale=inversion_lr_scale,
                   source=TensorSource("synthetic", batch_size=inversion_batch_size, steps_per_epoch=inversion_steps))
    distil_models = {"student": setup.student, "teacher": teacher, "synthetic": images}
    kd = FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"), weights["kd_weight"], temperature=kd_temperature)
    distil = Stage("distil", Distiller(distil_models, [kd]), source=TensorSource("synthetic"))
    return Recipe("deepinversion", [invert, distil])


# ---------------------------------------------------------------------------------------------------------- ZSKD

ZSKD_PAPER = ("Nayak, Mopuri, Shaj, Babu, Chakraborty. Zero-Shot Knowledge Distillation in Deep Networks. "
              "ICML 2019")
ZSKD_APPROXIMATION = (
    "approximation of vcl-iisc/ZSKD: the impression and KD losses are the official ones, but the concentration is "
    "β·(row of the class similarity, min-max normalised) + 1e-4 as the paper states (the official generateDirch "
    "re-normalises each row of the pre-scaled matrix, which cancels β = 0.1), all impressions are optimised "
    "jointly from one initialisation by the run's optimiser and schedule (officially Adam lr 0.001, 1500 "
    "iterations per batch of 100, a class's batches one after the other from the previous result, the batch "
    "min-max re-normalised to [0, 1] each iteration: not done here), and the soft targets of the KD stage are the "
    "teacher's on the final impressions (officially those of the last iteration, before its update)")


class ImpressionData(SyntheticData):
    """A :class:`~kdkernels.distill.sources.SyntheticData` with a soft target per image (``soft_targets`` ``[N, C]``,
    a checkpointed buffer): Zero-Shot KD's Dirichlet-sampled targets of its data impressions."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, soft_targets: torch.Tensor):
        super().__init__(images, labels)
        if soft_targets.shape[0] != images.shape[0] or soft_targets.dim() != 2:
            raise ValueError(f"ImpressionData: soft_targets must have shape [N, C] with N = {images.shape[0]}, got "
                             f"{tuple(soft_targets.shape)}")
        self.register_buffer("soft_targets", soft_targets.detach().clone().float())


class ImpressionTerm(Term):
    """``weight · zskd_impression_loss(z_t, y[index], T)``: the teacher's tempered softmax on the impressions of the
    batch against their Dirichlet targets (looked up by the batch's ``index`` in the data model, referenced)."""

    def __init__(self, data: ImpressionData, temperature: float, weight: float = 1.0):
        super().__init__("impression", ("teacher", "index"), weight)
        self._data = [data]
        self.temperature = temperature

    def loss(self, teacher, index, *, context):
        targets = self._data[0].soft_targets[index.long()]
        return kdkernels.zskd_impression_loss(teacher, targets, self.temperature)


def dirichlet_targets(similarity: torch.Tensor, labels: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """One Dirichlet sample per image: class ``labels[i]``'s similarity row, min–max normalised, times ``betas[i]``,
    plus 1e-4, as the concentration (vcl-iisc/ZSKD ``generateDirch``, with the paper's β scaling)."""
    rows = similarity[labels]
    low, high = rows.min(1, keepdim=True).values, rows.max(1, keepdim=True).values
    concentration = (rows - low) / (high - low).clamp_min(1e-12) * betas[:, None] + 1e-4
    return torch.distributions.Dirichlet(concentration.double()).sample().float()


def _zskd_kd(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float) -> torch.Tensor:
    return temperature ** 2 * kdkernels.soft_cross_entropy_loss(student, teacher.detach(), temperature)


@register("zskd", category="data-free", paper=ZSKD_PAPER, approximation=ZSKD_APPROXIMATION, presets={
    "digits": {"num_impressions": 500, "impression_steps": 500, "impression_weight": 1000.0,
               "impression_lr_scale": 100.0, "kd_weight": 0.05},
    "cifar10": {"image_shape": (3, 32, 32), "num_impressions": 40000, "impression_batch_size": 100,
                "impression_steps": 1500}})
def zskd(setup: Setup, temperature: float = 20.0, betas: tuple = (1.0, 0.1), num_impressions: int = 400,
         impression_batch_size: int | None = None, impression_steps: int | None = None, impression_epochs: int = 1,
         impression_lr_scale: float = 1.0, impression_weight: float = 1.0, image_shape: tuple = (1, 8, 8),
         kd_weight: float = 1.0, classifier: str | None = None) -> Recipe:
    """Zero-Shot KD with data impressions: sample soft targets ``y ~ Dir(β·ŝ_c + 1e-4)`` from the class similarity of
    the teacher's final-layer weights (``ŝ_c`` the row of class c of ``S = norm(ŴŴᵀ)``, min–max normalised), optimise
    images x (from U[0, 1)) so that ``mean_b −Σ_c y_bc log softmax(t(x)/T)_bc`` is minimal (T = 20), then distil the
    student on the impressions with ``kd·T²·mean_b −Σ_c softmax(t(x)/T) log softmax(s(x)/T)`` (T = 20); the student
    never reads a training image.

    Nayak et al. (ICML 2019); official code vcl-iisc/ZSKD (commit 54c855f): ``di_generation/dirichmat.py`` (S from
    the L2-normalised last-layer weights, min–max normalised; the β = 1 and β = 0.1 matrices),
    ``di_generation/cifar_10_impressions_alexnet_Dirch.py`` (``generateDirch``, the impression loss
    :func:`kdkernels.zskd_impression_loss` at T = 20, half the impressions of each class at β 1.0, half at 0.1:
    rows 0–9 and 10–19 of ``simMat``) and ``model_training/train.py`` (KD: ``T²·softmax_cross_entropy(logits/T,
    teacher soft targets)``, T = 20). Recipe: stage ``"impressions"`` trains an :class:`ImpressionData` of
    ``num_impressions`` images (class ``i mod C``, U[0, 1) initialised, targets sampled when the recipe is built from
    the teacher's ``classifier`` weight, default ``kd_points.classifier``; β over ``betas`` every C images: half of
    each class's impressions at β 1.0, half at 0.1) through a
    :class:`~kdkernels.distill.sources.TensorSource` (``impression_batch_size``, default all) for
    ``impression_epochs`` × ``impression_steps`` steps (default an epoch of the run's training set; officially 1500
    iterations, preset ``cifar10``) at ``impression_lr_scale`` × the run's rate, the impression loss weighted by
    ``impression_weight`` (1 officially); stage ``"distil"`` trains the student on the frozen impressions for the
    run's epochs. Presets: ``cifar10`` (official: 40000 impressions, batches of 100, 1500 iterations) and ``digits``,
    chosen here for the bundled 8×8 digits and the run's SGD with weight decay (the official Adam is scale-free):
    500 impressions in one batch, 500 steps, the impression loss ×1000 at 100× the rate (a large rate alone meets
    the weight decay, which then shrinks the images), the KD term ×0.05 (the official T² = 400 weighting made the
    SGD student collapse to one class). Digits demo, 1 seed, 30 epochs (ce 90.5 %): weight 1 at 10× (kd 1) /
    1000× (kd 0.05) the rate 9.6 / 9.6 %; weight 1000, kd 0.05, at 1× / 10× / 100× 23.7 / 32.1 / 32.3 % (the
    preset); kd 1 or 0.0025 at 10× 23.0 / 18.2 %; weight 10⁴ at 10× 15.8 %. See ``approximation`` for the
    deviations.
    """
    check = Checks("zskd")
    temperature = check.temperature(temperature)
    if isinstance(betas, (str, bytes)) or not isinstance(betas, (tuple, list)) or not betas:
        check.type_error("betas", "a non-empty tuple of positive reals", betas)
    betas = tuple(check.real("betas", beta, positive=True) for beta in betas)
    num_impressions = check.integer("num_impressions", num_impressions, minimum=1)
    impression_batch_size = num_impressions if impression_batch_size is None \
        else check.integer("impression_batch_size", impression_batch_size, minimum=1, maximum=num_impressions)
    if impression_steps is not None:
        impression_steps = check.integer("impression_steps", impression_steps, minimum=1)
    impression_epochs = check.integer("impression_epochs", impression_epochs, minimum=1)
    impression_lr_scale = check.real("impression_lr_scale", impression_lr_scale, positive=True)
    impression_weight = check.real("impression_weight", impression_weight, positive=True)
    kd_weight = check.real("kd_weight", kd_weight, minimum=0.0)
    channels, height, width = _image_shape(check, image_shape)
    teacher = setup.require_teacher("zskd")
    if classifier is None:
        classifier = feature_points(teacher).classifier
    layer = dict(teacher.named_modules()).get(classifier)
    if not isinstance(layer, nn.Linear) or layer.out_features != setup.num_classes:
        raise ValueError(f"zskd: classifier {classifier!r} must name the teacher's final nn.Linear with "
                         f"{setup.num_classes} outputs, got {type(layer).__name__}")
    labels = torch.arange(num_impressions) % setup.num_classes
    beta_of = torch.tensor(betas)[(torch.arange(num_impressions) // setup.num_classes) % len(betas)]
    similarity = kdkernels.zskd_class_similarity(layer.weight.detach())
    data = ImpressionData(torch.rand(num_impressions, channels, height, width), labels,
                          dirichlet_targets(similarity, labels, beta_of))
    impression = ImpressionTerm(data, temperature, impression_weight)
    impressions = Stage("impressions", Distiller({"teacher": teacher, "synthetic": data}, [impression],
                                                 trainable=("synthetic",), evaluate=("teacher",)),
                        epochs=impression_epochs, lr_scale=impression_lr_scale,
                        source=TensorSource("synthetic", batch_size=impression_batch_size,
                                            steps_per_epoch=impression_steps))
    kd = FunctionTerm("kd", _zskd_kd, ("student", "teacher"), kd_weight, temperature=temperature)
    distil = Stage("distil", Distiller({"student": setup.student, "teacher": teacher, "synthetic": data}, [kd]),
                   source=TensorSource("synthetic"))
    return Recipe("zskd", [impressions, distil])
