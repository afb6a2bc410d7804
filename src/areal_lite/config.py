"""Config: the first stage of a run; one typed tree of sections, read from TOML.

`load_config("config.toml", ["rollout.agent.mode=subproc"])` (in `config_toml.py`)
returns an `ExperimentConfig`; every component receives only its own section
(`RolloutEngine(cfg.rollout, ...)`), never the root.

This module owns the tree: each section declares its fields' types, ranges and choices
(`Literal`, `msgspec.Meta`) and, in `__post_init__`, the rules between fields, raising
`_FieldError` with keys relative to that section (the loader prefixes them and reports a
`ConfigError` naming the dotted key and where its value came from).

Adding a section is a 5-line change: write a Struct with `kw_only=True,
forbid_unknown_fields=True` and commented fields, then add
`name: NewConfig = msgspec.field(default_factory=NewConfig)` to `ExperimentConfig`.
Loading, error messages and `config_to_toml` walk the tree generically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "ActorConfig",
    "AgentConfig",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "LocalEngineConfig",
    "OpenAIConfig",
    "ProxyConfig",
    "RolloutConfig",
    "SGLangConfig",
    "SamplingConfig",
    "SchedulerConfig",
    "TrainerConfig",
    "run_path",
]

class ConfigError(ValueError):
    """A config value, key, file or override that can't be used; the message says which."""


class _FieldError(ConfigError):
    """A rule between fields failed; `keys` are relative to the section that raised it.

    `template` has one `{i}` slot per key (and named slots for `values`), so the loader
    can re-render it with full dotted keys and say where the values came from.
    """

    def __init__(self, template: str, *keys: str, **values: Any) -> None:
        self.template, self.keys, self.values = template, keys, values
        super().__init__(template.format(*keys, **values))


# Constrained scalar types (msgspec checks them and reports the violated bound).
PosInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
ToolParser = Literal["auto", "hermes", "qwen", "llama3", "mistral", "none"]
Beta = Annotated[float, msgspec.Meta(ge=0, lt=1)]  # an EMA/momentum coefficient


class AlgorithmConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The `algorithm` section: how rewards become advantages and logprobs a loss.

    Loss aggregation: token_mean = sum over loss tokens / loss tokens in the batch;
    seq_mean_token_sum (Dr.GRPO) = sum over loss tokens / (sequences x max_new_tokens);
    seq_mean_token_mean = mean over each sequence's tokens, then over sequences.
    Behaviour weight cap: tokens whose pi_prox/pi_behav exceeds it are masked out (loss 0,
    still counted in the normalizer).
    """

    adv_estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce"] = "grpo"  # see module doc
    reinforce_baseline: bool = False  # reinforce only: subtract the batch mean episode reward
    loss_agg: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"] = "token_mean"  # see above
    clip_eps_low: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.2  # ratio clipped below at 1 - this
    clip_eps_high: NonNegFloat = 0.2  # ... and above at 1 + this; 0.28 = DAPO clip-higher
    behav_imp_weight_cap: NonNegFloat = 5.0  # max pi_prox/pi_behav per token (>= 1); 0 = no cap
    kl_coef: NonNegFloat = 0.0  # weight of the KL penalty to a frozen reference; 0 = no reference
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # per-token estimator of KL(pi || ref)
    dynamic_filtering: bool = False  # drop groups whose rewards are all equal (DAPO)
    overlong_buffer_len: Annotated[int, msgspec.Meta(ge=0)] = 0  # tokens of soft overlong ramp; 0 = off
    overlong_penalty_factor: NonNegFloat = 1.0  # penalty at the length limit, in reward units
    eps: Annotated[float, msgspec.Meta(gt=0)] = 1e-6  # added to the group std in grpo (reward units)



class LearnerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The `train` section: optimizer, learning-rate schedule, micro-batches, PPO updates."""

    lr: PosFloat = 1e-6  # peak AdamW learning rate (reached after warmup)
    weight_decay: NonNegFloat = 0.0  # AdamW decoupled weight decay coefficient
    adam_betas: tuple[Beta, Beta] = (0.9, 0.999)  # AdamW moment decay rates, each in [0, 1)
    adam_eps: PosFloat = 1e-8  # AdamW denominator epsilon
    grad_clip: NonNegFloat = 1.0  # max global L2 norm of the gradient; 0 = no clipping
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"  # decay after warmup
    warmup_steps: NonNegInt = 0  # train steps of linear warmup from lr / warmup_steps up to lr
    total_steps: NonNegInt = 0  # train steps by which cosine/linear decay reaches 0; 0 = no decay
    max_tokens_per_microbatch: PosInt = 4096  # padded tokens (rows x longest row) per forward
    packing: bool = True  # sort by length and fill micro-batches up to the token budget
    # rows sharing a prompt run it once (its cache expanded to the rows) and the LM head
    # runs only where a token is trained (train/forward.py)
    fast_forward: bool = True  # exact, same values and gradients; false = plain forward
    ppo_epochs: PosInt = 1  # passes over each batch
    num_minibatches: PosInt = 1  # optimizer steps per pass (the batch is split in this many)
    recompute_proximal: bool = True  # proximal logprobs from current weights; False = behaviour
    # bfloat16 pays off on a CPU with AMX (~2x); with AVX512-BF16 alone it is ~1.7x slower
    compute_dtype: Literal["auto", "fast", "float32", "bfloat16"] = "auto"  # autocast; auto = bf16 on CUDA only, fast = also on an AMX CPU

    def __post_init__(self) -> None:
        if self.total_steps and self.lr_schedule != "constant" and self.total_steps <= self.warmup_steps:
            raise ValueError(f"train.total_steps must be > train.warmup_steps for a decay "
                             f"schedule, got {self.total_steps} <= {self.warmup_steps}")



class MetricsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What the run shows and where (`[metrics]` section)."""

    jsonl: bool = True  # append every logged step to {run_dir}/metrics.jsonl
    tensorboard: bool = False  # also write TensorBoard events to {run_dir}/tensorboard
    wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb`)
    wandb_project: str = "areal-lite"  # W&B project the run is logged under
    plots: bool = True  # write PNG curves into the run directory when plot() is called
    progress: bool = True  # show a one-line progress display on stderr
    log_every: Annotated[int, msgspec.Meta(ge=1)] = 1  # write every N-th step (eval steps always)



class ActorConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The policy model being trained (and served for rollouts)."""

    path: str = "smollm2-135m-instruct"  # HF checkpoint dir, hub id, or the embedded alias
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 cpu, bf16 cuda
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory


class AgentConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How agent episodes run and how their completions become training samples."""

    mode: Literal["inline", "subproc", "online"] = "inline"  # rollout loop, process pool, outside
    turn_discount: Fraction = 1.0  # reward multiplier per turn walked back along the tree
    discount_agg: Literal["mean", "max"] = "mean"  # how a parent combines its children's rewards
    # tree: concat's samples, but each completion's span keeps its own reward (individual's
    # advantages, each prefix computed once: fewer training tokens for multi-turn agents)
    export_style: Literal["individual", "concat", "tree"] = "individual"  # 1 sample/completion, /leaf, /leaf + per-span rewards
    train_shared_once: bool = True  # concat/tree: a prefix shared by leaves is trained once
    subproc_max_workers: PosInt = 4  # processes in the pool when mode = "subproc"
    agent_kwargs: dict[str, Any] = {}  # extra kwargs for the workflow constructor (a class)
    online_session_timeout_s: PosFloat = 600.0  # online: a session not ended by then is freed, s
    online_allow_remote: bool = False  # online: allow a non-loopback rollout.proxy.host


class OpenAIConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The reference documents' `rollout.openai` section, folded into `rollout.agent`."""

    mode: Literal["", "inline", "subproc", "online"] = ""  # older name of agent.mode; "" = unset


class ProxyConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The OpenAI/Anthropic-compatible HTTP proxy agents talk to."""

    host: str = "127.0.0.1"  # interface to bind
    port: Port = 0  # TCP port; 0 = pick a free one
    model_name: str = "default"  # model id the proxy serves (agents pass it as `model`)
    tool_parser: ToolParser = "auto"  # tool-call syntax in model output; auto = from the model
    reasoning_parser: Literal["none", "think"] = "none"  # "think": split <think>...</think>
    chat_template_kwargs: dict[str, Any] = {}  # extra variables for the chat template
    tool_fallback: Literal["hermes", "none"] = "hermes"  # template without tool markup: hermes = schemas in the system message, <tool_call> parsed; none = tools dropped
    max_request_mb: PosFloat = 16.0  # largest accepted request body, MiB
    max_message_chars: PosInt = 1 << 20  # longest text of one message, characters
    max_prompt_chars: PosInt = 1 << 22  # longest rendered prompt of one request, characters
    render_offload_chars: NonNegInt = 1 << 16  # requests with more text render off the loop
    body_timeout_s: PosFloat = 30.0  # a request body must arrive within this, seconds
    idle_timeout_s: PosFloat = 30.0  # a connection idle (or mid-headers) this long is closed


class SamplingConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Sampling defaults the proxy applies when a request doesn't set them."""

    max_new_tokens: PosInt = 512  # tokens to generate at most per completion
    temperature: NonNegFloat = 1.0  # 0 = greedy
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0  # nucleus mass in (0, 1]
    top_k: Annotated[int, msgspec.Meta(ge=-1)] = -1  # -1 = whole vocabulary

    def __post_init__(self) -> None:
        if self.top_k == 0:
            raise _FieldError("{0} must be -1 (whole vocabulary) or >= 1, got 0", "top_k")


class LocalEngineConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The in-process torch inference engine (rollout.backend = "local")."""

    max_batch_size: PosInt = 64  # sequences decoded together per step
    max_kv_tokens: PosInt = 65536  # KV-cache capacity, tokens summed over sequences
    max_context_len: NonNegInt = 0  # prompt + output tokens; 0 = the model's own limit
    prefix_cache_tokens: NonNegInt = 8192  # KV tokens of recent prompts kept for reuse; 0 = off
    fused_forward: bool = True  # Llama-family: decode + prefill in one own pass; false = HF forward
    # CPU, asynchronous RL: the learner gets the other torch threads while it runs (all
    # of them while the engine is idle), the engine all back after (engine/local/threads.py)
    engine_threads: Annotated[int, msgspec.Meta(ge=-1)] = 0  # -1 off, 0 = 1 engine thread, N = N


class SGLangConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """External SGLang servers (rollout.backend = "sglang")."""

    urls: list[str] = []  # server base URLs, e.g. "http://10.0.0.1:30000"
    api_key: str = ""  # bearer token for the servers; "" = none
    request_timeout_s: PosFloat = 3600.0  # one /generate call, seconds
    connect_timeout_s: PosFloat = 10.0  # opening a connection, seconds
    max_retries: NonNegInt = 3  # retries of a failed request at least (more within outage_timeout_s)
    max_connections: PosInt = 1024  # keep-alive pool size over all servers
    lean_http: bool = True  # plain /generate over our own HTTP/1.1 pool (less CPU); false = aiohttp
    weight_update: Literal["tensor", "distributed", "disk"] = "disk"  # how new weights arrive
    tp_size: PosInt = 1  # tensor-parallel size of each server
    weight_group_host: str = ""  # trainer address the servers reach (distributed); "" = 127.0.0.1
    weight_group_port: Port = 0  # rendezvous TCP port on the trainer; 0 = pick a free one
    weight_group_backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto = nccl if CUDA, else gloo
    weight_group_timeout_s: PosFloat = 600.0  # limit to join the group, and for one update, seconds
    outage_timeout_s: NonNegFloat = 180.0  # how long every server call retries through an outage, s
    launch: bool = False  # start, supervise and stop the servers ourselves (urls must be empty)
    launch_command: list[str] = []  # argv prefix; [] = [this python, "-m", "sglang.launch_server"]
    num_servers: PosInt = 1  # servers to launch, each with tp_size GPUs
    host: str = "127.0.0.1"  # address the launched servers bind and we call
    base_port: Port = 30000  # server i listens on base_port + i; 0 = free ports
    mem_fraction_static: Fraction = 0.0  # --mem-fraction-static; 0 = SGLang's automatic choice
    colocate: bool = False  # servers share the trainer's GPUs (--enable-memory-saver)
    server_args: list[str] = []  # extra flags for every launched server, e.g. ["--dtype", "bfloat16"]
    launch_timeout_s: PosFloat = 900.0  # start -> /health_generate answers 200, seconds
    max_restarts: NonNegInt = 3  # restarts of one launched server before the run fails
    restart_backoff_s: NonNegFloat = 2.0  # wait before a restart, doubled per restart of that server
    health_check_interval_s: NonNegFloat = 10.0  # probe launched servers; 3 misses = restart; 0 = off

    def __post_init__(self) -> None:
        for i, url in enumerate(self.urls):
            if not url.startswith(("http://", "https://")):
                raise _FieldError(
                    "{0} must start with http:// or https://, got {url!r}", f"urls[{i}]", url=url
                )
        if self.launch and self.urls:
            raise _FieldError("{0} must be empty when {1} = true (the launched servers' urls "
                              "are known at start); drop one of them", "urls", "launch")


class RolloutConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Generating episodes: batching, staleness, and the inference backend."""

    backend: Literal["local", "sglang"] = "local"  # in-process torch engine, or SGLang servers
    batch_size: PosInt = 8  # prompts (groups) per training step
    group_size: PosInt = 4  # episodes per prompt
    max_concurrent_rollouts: PosInt = 256  # episodes running at once
    max_head_offpolicyness: NonNegInt = 0  # staleness bound in weight versions; 0 = sync RL
    episode_timeout_s: PosFloat = 600.0  # wall time of one episode, seconds
    max_episode_failures_frac: Fraction = 1.0  # failed episodes a batch may hold (fraction); over it: dropped
    agent: AgentConfig = msgspec.field(default_factory=AgentConfig)  # episodes -> samples
    openai: OpenAIConfig = msgspec.field(default_factory=OpenAIConfig)  # older names (aliases)
    proxy: ProxyConfig = msgspec.field(default_factory=ProxyConfig)  # the agents' HTTP API
    sampling: SamplingConfig = msgspec.field(default_factory=SamplingConfig)  # defaults
    local: LocalEngineConfig = msgspec.field(default_factory=LocalEngineConfig)  # backend=local
    sglang: SGLangConfig = msgspec.field(default_factory=SGLangConfig)  # backend=sglang

    def __post_init__(self) -> None:
        if self.backend == "sglang" and not self.sglang.urls and not self.sglang.launch:
            raise _FieldError(
                "{0} must list at least one server URL when {1} = 'sglang' (or set "
                "{2} = true)",
                "sglang.urls",
                "backend",
                "sglang.launch",
            )
        if self.openai.mode:
            if self.agent.mode not in ("inline", self.openai.mode):
                raise _FieldError("{0} = {a!r} and {1} = {b!r} disagree; set only {0} ({1} is "
                                  "its older name)", "agent.mode", "openai.mode",
                                  a=self.agent.mode, b=self.openai.mode)
            self.agent.mode, self.openai.mode = self.openai.mode, ""
        loopback = self.proxy.host in ("127.0.0.1", "localhost", "::1")
        if self.agent.mode == "online" and not loopback and not self.agent.online_allow_remote:
            raise _FieldError("{0} = {host!r} serves agents beyond this machine: set {1} = true "
                              "to allow it (the admin key then guards the run)", "proxy.host",
                              "agent.online_allow_remote", host=self.proxy.host)


class SchedulerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where processes run: this machine, or a Slurm allocation."""

    type: Literal["local", "slurm"] = "local"  # "slurm" for multi-node runs
    nodes: PosInt = 1  # machines in the job
    gpus_per_node: NonNegInt = 0  # GPUs used per machine; 0 = all visible ones (auto)
    train_processes: PosInt = 1  # learner processes per trainer node (torchrun); > 1 = FSDP2
    inference_nodes: NonNegInt = 0  # slurm: nodes running SGLang servers (the rest train)
    partition: str = ""  # slurm: --partition; "" = the cluster's default
    time_limit: str = ""  # slurm: --time, e.g. "04:00:00"; "" = the partition's default
    sbatch_args: list[str] = []  # slurm: extra #SBATCH lines, e.g. ["--account=rl"]
    rdzv_port: Port = 29500  # slurm: torchrun rendezvous TCP port on the first trainer node

    def __post_init__(self) -> None:
        if self.type == "local" and self.nodes != 1:
            raise _FieldError(
                "{0} must be 1 when {1} = 'local' (use 'slurm'), got {n}",
                "nodes",
                "type",
                n=self.nodes,
            )


class DataConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where prompts come from."""

    train: str = "arithmetic"  # "arithmetic[:N]" (generated), a .jsonl/.parquet path, or a HF dataset
    eval: str = "arithmetic:64"  # same forms; "" = no eval split
    shuffle: bool = True  # reshuffle the train rows every epoch (seeded)


class TrainerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The training loop's schedule."""

    total_steps: PosInt = 20  # RL steps (one batch of groups + one policy update each)
    eval_every: NonNegInt = 5  # steps between greedy evals of the eval split; 0 = never
    save_every: NonNegInt = 5  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: PosInt = 2  # newest checkpoints kept on disk
    max_eval_prompts: NonNegInt = 0  # eval rows used per eval; 0 = all
    eval_solved_reward: float = 1.0  # a turn whose raw reward is >= this counts as solved (eval/first_try)


class ExperimentConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The whole run. Outputs go to `{run_dir}/{experiment_name}/{trial_name}`."""

    experiment_name: str = "areal-lite"  # groups trials; a directory name
    trial_name: str = "trial0"  # one run of the experiment; a directory name
    seed: int = 1  # seeds data order, sampling and init
    workflow: str = ""  # agent workflow, "pkg.mod.Class" or "pkg.mod:Class"
    agent_module_path: str = ""  # older name of `workflow`; folded into it on load
    run_dir: str = "runs"  # root directory for outputs
    actor: ActorConfig = msgspec.field(default_factory=ActorConfig)  # the policy model
    rollout: RolloutConfig = msgspec.field(default_factory=RolloutConfig)  # making episodes
    data: DataConfig = msgspec.field(default_factory=DataConfig)  # prompts
    trainer: TrainerConfig = msgspec.field(default_factory=TrainerConfig)  # loop schedule
    train: LearnerConfig = msgspec.field(default_factory=LearnerConfig)  # optimizer, micro-batches
    algorithm: AlgorithmConfig = msgspec.field(default_factory=AlgorithmConfig)  # advantages, loss
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)  # logging and plots
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)  # placement

    def __post_init__(self) -> None:
        for key in ("experiment_name", "trial_name"):
            name = getattr(self, key)
            if not name or "/" in name or "\\" in name or name in (".", ".."):
                raise _FieldError(
                    "{0} must be a directory name (non-empty, no '/'), got {name!r}", key, name=name
                )
        if self.agent_module_path:
            if self.workflow and self.workflow != self.agent_module_path:
                raise _FieldError(
                    "{0} = {a!r} and {1} = {b!r} disagree; set only {0} ({1} is its older name)",
                    "workflow",
                    "agent_module_path",
                    a=self.workflow,
                    b=self.agent_module_path,
                )
            self.workflow, self.agent_module_path = self.agent_module_path, ""

    @property
    def run_path(self) -> Path:
        """Directory this trial writes to."""
        return Path(self.run_dir) / self.experiment_name / self.trial_name


def run_path(cfg: ExperimentConfig) -> Path:
    """`{run_dir}/{experiment_name}/{trial_name}`: where the trial writes its outputs."""
    return cfg.run_path
