"""The deployment spec: one offer-ranking deployment (the ecosystem.Ai "campaign"), typed and validated.

The config service validates and versions it, predictor replicas apply it, ingest seeds its options
store from it, the trainer binds models into it. YAML and JSON files map onto it one to one; unknown
keys are errors, and every error names the field (`offers[2].price: ...`).
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import json
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from libs.common.errors import InvalidArgument

MAX_SPEC_BYTES = 1024 * 1024
DEPLOYMENT_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
OFFER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$"

Scalar = str | float | int | bool


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Environment(enum.StrEnum):
    DEV = "dev"
    TEST = "test"
    PROD = "prod"


class RuleOperator(enum.StrEnum):
    EQ = "eq"
    NE = "ne"
    IN = "in"
    NOT_IN = "not_in"
    GT = "gt"
    GE = "ge"
    LT = "lt"
    LE = "le"


class EligibilityRule(SpecModel):
    """An offer is shown only where every one of its rules holds for the request's context."""

    variable: str = Field(pattern=IDENTIFIER_PATTERN, description="A context variable of this deployment")
    operator: RuleOperator
    value: Scalar | list[Scalar]

    @model_validator(mode="after")
    def _value_fits_operator(self) -> EligibilityRule:
        is_list = isinstance(self.value, list)
        if self.operator in (RuleOperator.IN, RuleOperator.NOT_IN) and not is_list:
            raise ValueError(f"value: operator '{self.operator}' needs a list value")
        if self.operator not in (RuleOperator.IN, RuleOperator.NOT_IN) and is_list:
            raise ValueError(f"value: operator '{self.operator}' needs a single value, not a list")
        numeric = (RuleOperator.GT, RuleOperator.GE, RuleOperator.LT, RuleOperator.LE)
        if self.operator in numeric and (
            isinstance(self.value, bool) or not isinstance(self.value, int | float)
        ):
            raise ValueError(f"value: operator '{self.operator}' needs a number")
        return self


class OfferBudget(SpecModel):
    """How much of an offer may be shown per period, across every replica (a prediction activator):
    presentations (each shown offer counts 1) or value (each counts the offer's price)."""

    limit: float = Field(gt=0, allow_inf_nan=False, description="Presentations, or value, per period")
    period: Literal["hour", "day", "week", "total"] = Field(
        "day", description="Resets at each UTC hour, day or week (Monday); total never resets"
    )
    measure: Literal["presentations", "value"] = "presentations"


class Offer(SpecModel):
    id: str = Field(pattern=OFFER_ID_PATTERN, description="Stable offer identifier")
    name: str = Field("", max_length=200, description="Display name; defaults to the id")
    price: float = Field(0.0, ge=0)
    cost: float = Field(0.0, ge=0)
    category: str = Field("", max_length=100)
    weighting: float = Field(1.0, ge=0, description="Multiplies the offer's score (0 hides it)")
    eligibility: list[EligibilityRule] = Field(default_factory=list)
    attributes: dict[str, Scalar] = Field(default_factory=dict)
    budget: OfferBudget | None = None

    @model_validator(mode="after")
    def _name_defaults_to_id(self) -> Offer:
        if not self.name:
            object.__setattr__(self, "name", self.id)
        return self


class ContextSource(enum.StrEnum):
    FEATURE = "feature"  # a customer feature from the online store
    PARAM = "param"  # a value the caller sends in Invoke params
    VIRTUAL = "virtual"  # derived from other context variables


class VariableKind(enum.StrEnum):
    CATEGORICAL = "categorical"
    NUMERIC = "numeric"


class DiscretizeTransform(SpecModel):
    """Numeric input into labelled buckets: value < edges[0] -> labels[0], ..., >= edges[-1] -> labels[-1]."""

    kind: Literal["discretize"] = "discretize"
    input: str = Field(pattern=IDENTIFIER_PATTERN)
    edges: list[float] = Field(min_length=1, max_length=100)
    labels: list[str] = Field(min_length=2, max_length=101)

    @model_validator(mode="after")
    def _edges_and_labels_agree(self) -> DiscretizeTransform:
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges: must be strictly increasing")
        if len(self.labels) != len(self.edges) + 1:
            raise ValueError(
                f"labels: {len(self.edges)} edges need {len(self.edges) + 1} labels, got {len(self.labels)}"
            )
        return self


class ConcatTransform(SpecModel):
    """Several inputs joined into one categorical value (e.g. segment = gender|age_band)."""

    kind: Literal["concat"] = "concat"
    inputs: list[str] = Field(min_length=2, max_length=10)
    separator: str = Field("|", max_length=5)


Transform = Annotated[DiscretizeTransform | ConcatTransform, Field(discriminator="kind")]


class ContextVariable(SpecModel):
    """One input to scoring. Any number of them; categorical ones form the segment by default."""

    name: str = Field(pattern=IDENTIFIER_PATTERN)
    source: ContextSource
    field: str = Field("", max_length=100, description="Feature or param name; defaults to `name`")
    kind: VariableKind = VariableKind.CATEGORICAL
    default: Scalar | None = Field(None, description="Used when the feature or param is missing")
    transform: Transform | None = None
    segment: bool = Field(True, description="Part of the segment key (categorical variables only)")

    @model_validator(mode="after")
    def _source_fits(self) -> ContextVariable:
        if self.source is ContextSource.VIRTUAL and self.transform is None:
            raise ValueError("transform: a virtual variable needs a transform")
        if self.source is not ContextSource.VIRTUAL and self.transform is not None:
            raise ValueError("transform: only virtual variables have a transform")
        if not self.field:
            object.__setattr__(self, "field", self.name)
        return self


class ThompsonAlgorithm(SpecModel):
    """Beta-Bernoulli Thompson sampling per offer x segment (ecosystem.Ai "binaryThompson")."""

    approach: Literal["thompson"] = "thompson"
    alpha0: float = Field(1.0, gt=0, description="Prior successes")
    beta0: float = Field(1.0, gt=0, description="Prior failures")
    success_increment: float = Field(1.0, gt=0)
    fail_increment: float = Field(1.0, ge=0)
    half_life_seconds: float | None = Field(None, gt=0, description="Forget old evidence (drifting offers)")
    half_life_impressions: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Forget old evidence by traffic: halve it every this many impressions in the segment",
    )
    window_seconds: float | None = Field(None, gt=0, description="Learn only from this recent window")
    change_detection: bool = Field(
        False, description="Restart an arm's evidence when its recent take-up departs from its history"
    )
    count_cap: float | None = Field(None, gt=0, description="Cap on alpha+beta so the arm keeps learning")
    model_prior_weight: float = Field(0.0, ge=0, description="Pseudo-counts from the bound model's score")


class EpsilonGreedyAlgorithm(SpecModel):
    """Best observed take-up, with exploration at the deployment's exploration_epsilon."""

    approach: Literal["epsilon_greedy"] = "epsilon_greedy"
    half_life_seconds: float | None = Field(None, gt=0)
    half_life_impressions: float | None = Field(None, gt=0, allow_inf_nan=False)
    prior_take_up: float = Field(0.0, ge=0, le=1, description="Take-up assumed for offers with no history")


class NaiveBayesAlgorithm(SpecModel):
    """Take-up from naive Bayes over the discrete context values."""

    approach: Literal["naive_bayes"] = "naive_bayes"
    smoothing: float = Field(1.0, gt=0, description="Laplace smoothing")


class LinUcbAlgorithm(SpecModel):
    """Contextual linear bandit over numeric context variables (disjoint LinUCB)."""

    approach: Literal["linucb"] = "linucb"
    alpha: float = Field(1.0, ge=0, description="Width of the upper confidence bound")
    ridge: float = Field(1.0, gt=0)
    features: list[str] = Field(min_length=1, max_length=256)


class LinearThompsonAlgorithm(SpecModel):
    """Contextual linear Thompson sampling over numeric context variables."""

    approach: Literal["linear_thompson"] = "linear_thompson"
    scale: float = Field(0.25, gt=0, description="Posterior scale (exploration)")
    ridge: float = Field(1.0, gt=0)
    features: list[str] = Field(min_length=1, max_length=256)


class ModelAlgorithm(SpecModel):
    """Score = the bound model's predicted take-up; exploration at exploration_epsilon."""

    approach: Literal["model"] = "model"


Algorithm = Annotated[
    ThompsonAlgorithm
    | EpsilonGreedyAlgorithm
    | NaiveBayesAlgorithm
    | LinUcbAlgorithm
    | LinearThompsonAlgorithm
    | ModelAlgorithm,
    Field(discriminator="approach"),
]


class PluginStage(enum.StrEnum):
    PRE_SCORE = "pre_score"
    POST_SCORE = "post_score"
    REWARD = "reward"


class PluginErrorPolicy(enum.StrEnum):
    SKIP = "skip"  # the request goes on without the plugin (logged, counted, warned in the reply)
    FAIL = "fail"  # the request fails


class PluginRef(SpecModel):
    name: str = Field(
        pattern=IDENTIFIER_PATTERN, description="An installed plugin (entry point liveloop.plugins)"
    )
    stage: PluginStage
    params: dict[str, Any] = Field(default_factory=dict, description="Validated by the plugin's Params")
    on_error: PluginErrorPolicy = Field(
        PluginErrorPolicy.SKIP, description="When the plugin raises or runs past its budget on a request"
    )
    budget_ms: float = Field(
        5.0, gt=0, le=1000, allow_inf_nan=False, description="Time the plugin may take per request"
    )


class FeatureLookup(SpecModel):
    feature_view: str = Field(pattern=IDENTIFIER_PATTERN, description="Online feature view (table) to read")
    key: Literal["customer", "userid"] = Field("customer", description="Request field holding the entity key")
    defaults: dict[str, Scalar] = Field(default_factory=dict, description="Feature values on a miss")


class Whitelist(SpecModel):
    """Per-customer allowed offers (a prediction activator): a feature view that ingest loads and
    materializes, one row per customer, a column listing the offers that customer may be shown."""

    feature_view: str = Field(pattern=IDENTIFIER_PATTERN, description="Online feature view holding the lists")
    column: str = Field(
        "offers",
        min_length=1,
        max_length=200,
        description="Offer ids or names, comma-separated or a JSON list",
    )
    key: Literal["customer", "userid"] = Field("customer", description="Request field holding the entity key")
    when_missing: Literal["all", "none"] = Field(
        "all", description="A customer without a list: every offer stays eligible, or none does"
    )


class ModelBinding(SpecModel):
    name: str = Field(pattern=DEPLOYMENT_NAME_PATTERN)
    version: int = Field(ge=1)


class ModelSelector(SpecModel):
    """Choose the bound model per request by a context variable's value (a prediction activator,
    the ecosystem.Ai runtime's predictor.selector): a value it lists binds that model; any other
    value binds the deployment's `model`. A variant that binds its own model keeps it."""

    variable: str = Field(pattern=IDENTIFIER_PATTERN, description="A categorical context variable")
    models: dict[str, ModelBinding] = Field(min_length=1, max_length=1000, description="Value -> model")


class Routing(SpecModel):
    """This deployment routes each request to one of the deployments its offers name (an offer's id
    is the name of a deployment served beside it): by a context variable's value (`switch`), or by
    its own ranking of them (`ranking`, which learns from the responses which one serves best)."""

    by: Literal["switch", "ranking"]
    variable: str | None = Field(
        None, pattern=IDENTIFIER_PATTERN, description="switch: the categorical context variable switched on"
    )
    routes: dict[str, str] = Field(
        default_factory=dict, max_length=1000, description="switch: value -> offer id (deployment)"
    )
    default: str | None = Field(
        None, description="switch: the offer id of any other value (else the first offer)"
    )


MAX_CORPUS_ROWS = 100_000


class Corpus(SpecModel):
    """A named lookup table the deployment's plugins read (`request.corpora[name][key]`), versioned
    with the revision: its rows are part of the spec. `liveloop config publish` reads a `file:`
    beside the spec (CSV or JSON) or an ingested `table:` into rows, so publishing again after the
    file or the table changed makes a new revision."""

    key: str = Field(min_length=1, max_length=100, description="The column a row is looked up by")
    rows: list[dict[str, Scalar | None]] = Field(default_factory=list, max_length=MAX_CORPUS_ROWS)
    source: str = Field("", max_length=500, description="Where the rows came from (set by the CLI)")
    file: str | None = Field(None, description="Read into rows by `liveloop config publish`")
    table: str | None = Field(
        None, description="An ingested table, read into rows by `liveloop config publish`"
    )

    @model_validator(mode="after")
    def _keys_unique(self) -> Corpus:
        for name, source in (("file", self.file), ("table", self.table)):
            if source is not None:
                raise ValueError(
                    f"{name}: '{source}' is read by `liveloop config publish`, which sends its rows; send rows"
                )
        seen: set[str] = set()
        for index, row in enumerate(self.rows):
            value = row.get(self.key)
            if value is None or value == "":
                raise ValueError(f"rows[{index}]: no value for the key column '{self.key}'")
            text = str(value)
            if text in seen:
                raise ValueError(f"rows[{index}]: key '{text}' repeats")
            seen.add(text)
        return self


class Variant(SpecModel):
    """An experiment arm: a share of customers (sticky) served with overrides."""

    name: str = Field(pattern=IDENTIFIER_PATTERN)
    weight: float = Field(gt=0)
    algorithm: Algorithm | None = None
    exploration_epsilon: float | None = Field(None, ge=0, le=1)
    model: ModelBinding | None = None


class RewardSettings(SpecModel):
    window_seconds: float = Field(
        7 * 24 * 3600.0, gt=0, description="Responses later than this are not learned"
    )
    default_reward: float = Field(1.0, ge=0, description="Reward of an acceptance that names no value")


class PublishGate(SpecModel):
    """What a publish of this deployment must show first: the candidate's value estimated on the
    logged decisions (the monitor's EvaluatePolicy), against what the live revision earned."""

    require_evaluation: bool = Field(False, description="Every publish is evaluated before it is stored")
    max_regression: float = Field(
        0.0,
        ge=0,
        description="Refuse when the estimate's upper bound is below the live value by more than this",
    )
    estimator: Literal["ips", "snips", "dr"] = Field("dr", description="The estimate the gate reads")
    window_seconds: float = Field(7 * 24 * 3600.0, gt=0, description="Logged decisions evaluated on")
    confidence_level: float = Field(0.95, gt=0, lt=1)


class DeploymentSpec(SpecModel):
    name: str = Field(pattern=DEPLOYMENT_NAME_PATTERN)
    environment: Environment = Environment.DEV
    description: str = Field("", max_length=2000)
    campaigns: list[str] = Field(
        default_factory=list, description="Campaign names served; defaults to [name]"
    )
    offers: list[Offer] = Field(min_length=1, max_length=10_000)
    context_variables: list[ContextVariable] = Field(default_factory=list, max_length=256)
    algorithm: Algorithm = Field(default_factory=ThompsonAlgorithm)
    exploration_epsilon: float = Field(0.0, ge=0, le=1, description="Share of requests ranked at random")
    default_number_of_offers: int = Field(1, ge=1)
    plugins: list[PluginRef] = Field(default_factory=list)
    feature_lookup: FeatureLookup | None = None
    whitelist: Whitelist | None = None
    model: ModelBinding | None = None
    model_selector: ModelSelector | None = None
    variants: list[Variant] = Field(default_factory=list)
    reward: RewardSettings = Field(default_factory=RewardSettings)
    publish_gate: PublishGate = Field(default_factory=PublishGate)
    shadow: str | None = Field(
        None,
        pattern=DEPLOYMENT_NAME_PATTERN,
        description="A deployment whose decision is computed and logged for every request, never served",
    )
    routing: Routing | None = None
    corpora: dict[str, Corpus] = Field(default_factory=dict, max_length=100)

    @field_validator("corpora")
    @classmethod
    def _corpus_names(cls, corpora: dict[str, Corpus]) -> dict[str, Corpus]:
        for name in corpora:
            if not re.fullmatch(IDENTIFIER_PATTERN, name):
                raise ValueError(f"'{name}' is no corpus name: a letter or _, then letters, digits or _")
        return corpora

    @field_validator("campaigns")
    @classmethod
    def _campaign_names(cls, campaigns: list[str]) -> list[str]:
        for campaign in campaigns:
            if not campaign or len(campaign) > 200:
                raise ValueError("campaign names are 1 to 200 characters")
        if len(set(campaigns)) != len(campaigns):
            raise ValueError("campaign names repeat")
        return campaigns

    @model_validator(mode="after")
    def _references_resolve(self) -> DeploymentSpec:
        if not self.campaigns:
            object.__setattr__(self, "campaigns", [self.name])
        _unique([offer.id for offer in self.offers], "offers", "id")
        _unique([offer.name for offer in self.offers], "offers", "name")
        _unique([variant.name for variant in self.variants], "variants", "name")
        defined: dict[str, ContextVariable] = {}
        for index, variable in enumerate(self.context_variables):
            if variable.name in defined:
                raise ValueError(f"context_variables[{index}].name: '{variable.name}' is defined twice")
            transform = variable.transform
            inputs = [transform.input] if isinstance(transform, DiscretizeTransform) else []
            inputs += transform.inputs if isinstance(transform, ConcatTransform) else []
            for name in inputs:
                if name not in defined:
                    raise ValueError(
                        f"context_variables[{index}].transform: input '{name}' must be a context variable "
                        "defined above it"
                    )
            if (
                isinstance(transform, DiscretizeTransform)
                and defined[transform.input].kind is not VariableKind.NUMERIC
            ):
                raise ValueError(f"context_variables[{index}].transform: discretize needs a numeric input")
            if (
                isinstance(transform, DiscretizeTransform | ConcatTransform)
                and variable.kind is VariableKind.NUMERIC
            ):
                raise ValueError(f"context_variables[{index}].kind: a {transform.kind} result is categorical")
            defined[variable.name] = variable
        for offer_index, offer in enumerate(self.offers):
            for rule_index, rule in enumerate(offer.eligibility):
                if rule.variable not in defined:
                    raise ValueError(
                        f"offers[{offer_index}].eligibility[{rule_index}].variable: '{rule.variable}' is not a "
                        "context variable of this deployment"
                    )
        algorithms = [("algorithm", self.algorithm)] + [
            (f"variants[{i}].algorithm", v.algorithm) for i, v in enumerate(self.variants) if v.algorithm
        ]
        for where, algorithm in algorithms:
            if isinstance(algorithm, LinUcbAlgorithm | LinearThompsonAlgorithm):
                for name in algorithm.features:
                    feature = defined.get(name)
                    if feature is None or feature.kind is not VariableKind.NUMERIC:
                        raise ValueError(f"{where}.features: '{name}' must be a numeric context variable")
        if self.model_selector is not None:
            selector = defined.get(self.model_selector.variable)
            if selector is None or selector.kind is not VariableKind.CATEGORICAL:
                raise ValueError(
                    f"model_selector.variable: '{self.model_selector.variable}' must be a categorical context variable"
                )
        for where, algorithm in [("algorithm", self.algorithm)] + [
            (f"variants[{i}].algorithm", v.algorithm) for i, v in enumerate(self.variants) if v.algorithm
        ]:
            if isinstance(algorithm, ThompsonAlgorithm) and algorithm.change_detection:
                other = [
                    name
                    for name in ("half_life_seconds", "half_life_impressions", "window_seconds", "count_cap")
                    if getattr(algorithm, name) is not None
                ]
                if other:
                    raise ValueError(
                        f"{where}.change_detection: it decides what to forget itself; drop {', '.join(other)}"
                    )
        if self.shadow is not None and self.shadow == self.name:
            raise ValueError("shadow: a deployment cannot shadow itself")
        if self.routing is not None:
            self._check_routing(self.routing)
        if _needs_model(self.algorithm) and self.model is None:
            raise ValueError(f"model: {_needs_model(self.algorithm)} needs a model binding")
        for index, variant in enumerate(self.variants):
            needs = _needs_model(variant.algorithm or self.algorithm)
            if needs and variant.model is None and self.model is None:
                raise ValueError(f"variants[{index}].model: {needs} needs a model binding")
        return self

    def _check_routing(self, routing: Routing) -> None:
        for index, offer in enumerate(self.offers):
            if not re.fullmatch(DEPLOYMENT_NAME_PATTERN, offer.id) or offer.id == self.name:
                raise ValueError(
                    f"offers[{index}].id: a routing deployment's offers name the deployments it routes to; "
                    f"'{offer.id}' is not another deployment's name"
                )
            if offer.budget is not None:
                raise ValueError(
                    f"offers[{index}].budget: a route has no budget (give the offers of '{offer.id}' theirs)"
                )
        if self.shadow is not None:
            raise ValueError(
                "shadow: a routing deployment has no shadow; name it on the deployments it routes to"
            )
        ids = {offer.id for offer in self.offers}
        if routing.by == "switch":
            variable = next((v for v in self.context_variables if v.name == routing.variable), None)
            if variable is None or variable.kind is not VariableKind.CATEGORICAL:
                raise ValueError(
                    f"routing.variable: a switch needs a categorical context variable, not {routing.variable!r}"
                )
            for value, target in routing.routes.items():
                if target not in ids:
                    raise ValueError(f"routing.routes.{value}: '{target}' is not an offer of this deployment")
            if routing.default is not None and routing.default not in ids:
                raise ValueError(f"routing.default: '{routing.default}' is not an offer of this deployment")
        else:
            if routing.variable is not None or routing.routes or routing.default is not None:
                raise ValueError("routing: variable, routes and default belong to `by: switch`")
            for where, algorithm in [("algorithm", self.algorithm)] + [
                (f"variants[{i}].algorithm", v.algorithm) for i, v in enumerate(self.variants) if v.algorithm
            ]:
                if algorithm.approach not in ("thompson", "epsilon_greedy"):
                    raise ValueError(
                        f"{where}: a ranking router learns per deployment, with thompson or epsilon_greedy"
                    )

    def model_bindings(self) -> list[ModelBinding]:
        """Every model version the spec binds: the deployment's, its variants', its selector's."""
        bindings = [self.model, *(variant.model for variant in self.variants)]
        if self.model_selector is not None:
            bindings += self.model_selector.models.values()
        return [binding for binding in bindings if binding is not None]

    @property
    def segment_variables(self) -> list[str]:
        return [v.name for v in self.context_variables if v.segment and v.kind is VariableKind.CATEGORICAL]


def _needs_model(algorithm: Algorithm) -> str:
    """Why this algorithm needs a bound model ('' when it does not)."""
    if isinstance(algorithm, ModelAlgorithm):
        return "the 'model' algorithm"
    if isinstance(algorithm, ThompsonAlgorithm) and algorithm.model_prior_weight > 0:
        return "thompson with model_prior_weight > 0"
    return ""


def _unique(values: list[str], collection: str, field: str) -> None:
    seen: set[str] = set()
    for index, value in enumerate(values):
        if value in seen:
            raise ValueError(f"{collection}[{index}].{field}: '{value}' appears twice")
        seen.add(value)


_FIELD_REFERENCE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[\d+\])*(\.[A-Za-z_][A-Za-z0-9_]*(\[\d+\])*)*$")


def _field_path(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif (
            part
            in {
                "thompson",
                "epsilon_greedy",
                "naive_bayes",
                "linucb",
                "linear_thompson",
                "model",
                "discretize",
                "concat",
            }
            and path
        ):
            continue  # discriminator tags pydantic inserts into the location
        else:
            path += f".{part}" if path else str(part)
    return path


def deployment_spec_from_mapping(document: Any) -> DeploymentSpec:
    """Validate a decoded document; raise InvalidArgument naming the first bad field."""
    if not isinstance(document, dict):
        raise InvalidArgument("a deployment spec is a mapping of fields", field="spec")
    try:
        return DeploymentSpec.model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        path = _field_path(tuple(error["loc"]))
        message = str(error["msg"]).removeprefix("Value error, ")
        prefix, separator, rest = message.partition(": ")
        if separator and _FIELD_REFERENCE.fullmatch(prefix):
            # A validator named the field it refers to: below its model, or from the top.
            path, message = (f"{path}.{prefix}" if path else prefix), rest
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            path = f"{path}.{error['ctx'].get('discriminator', 'kind').strip(chr(39))}"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise InvalidArgument(message + more, field=path or "spec") from None


def parse_deployment_spec(text: str, format: Literal["json", "yaml"] | None = None) -> DeploymentSpec:
    """Decode JSON or YAML text (format detected when None) and validate it."""
    size = len(text.encode())
    if size > MAX_SPEC_BYTES:
        raise InvalidArgument(f"spec is {size} bytes; the limit is {MAX_SPEC_BYTES}", field="spec")
    if format is None:
        format = "json" if text.lstrip().startswith("{") else "yaml"
    try:
        document = json.loads(text) if format == "json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidArgument(f"not valid {format.upper()}: {exc}".splitlines()[0], field="spec") from None
    return deployment_spec_from_mapping(document)


def canonical_json(spec: DeploymentSpec) -> str:
    """Every field explicit, keys sorted, no whitespace: equal specs give equal text and checksum."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def spec_checksum(canonical: str) -> str:
    return hashlib.sha256(canonical.encode()).hexdigest()


def spec_diff(old_canonical: str, new_canonical: str, old_label: str, new_label: str) -> str:
    """Unified diff of the two specs, pretty-printed so each field is a line."""

    def lines(canonical: str) -> list[str]:
        if not canonical:
            return []
        return json.dumps(json.loads(canonical), indent=2, sort_keys=True).splitlines(keepends=True)

    return "".join(difflib.unified_diff(lines(old_canonical), lines(new_canonical), old_label, new_label))
