"""Write the demo's sample data set: customers of a telco and the offers they were shown.

    python tools/make_sample_data.py            # rewrites examples/data/
    python tools/make_sample_data.py --check    # exit 1 if examples/data/ differs from what it writes

Deterministic (a seeded generator, fixed dates), so the files in git are exactly what this writes.

customers.csv: customer (key), age, gender, trips_per_year, signup_time. The columns the example
deployment (examples/deployments/telco-offers.yaml) looks up in the `customers` feature view, and
those the example feature spec (examples/features/telco-features.yaml) reads.

history.csv: one row per offer shown: customer, offer, accepted (0/1), channel, the customer's
age_band and gender at the time (the deployment's segment variables, as the decision log records
them), presented_at. Take-up depends on the offer and the segment, so priors differ by segment.

events.csv: the same presentations as the `events` table the example feature spec reads: customer,
event_time, offer, accepted, amount (the offer's price when taken, else 0).
"""

from __future__ import annotations

import argparse
import io
import random
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "examples" / "data"
SEED = 20240501
CUSTOMERS = 1000
PRESENTATIONS = 4000
START = datetime(2024, 1, 1, tzinfo=UTC)

# From examples/deployments/telco-offers.yaml: age_band discretizes age at 25, 40, 60.
AGE_EDGES = (25, 40, 60)
AGE_LABELS = ("young", "adult", "middle", "senior")
CHANNELS = ("app", "web")
# Base take-up per offer, then a multiplier per age band: the young take data, seniors voice.
TAKE_UP = {
    "data-1gb": 0.10,
    "data-5gb": 0.16,
    "data-20gb": 0.08,
    "voice-100": 0.10,
    "voice-unlimited": 0.07,
    "roaming-week": 0.12,
    "family-bundle": 0.06,
}
AGE_FACTOR = {
    "young": {"data-20gb": 3.0, "data-5gb": 1.8, "voice-unlimited": 0.4, "family-bundle": 0.2},
    "adult": {"data-5gb": 1.4, "family-bundle": 2.5},
    "middle": {"family-bundle": 2.0, "voice-100": 1.5},
    "senior": {"voice-unlimited": 3.5, "voice-100": 2.0, "data-20gb": 0.3},
}
# From examples/deployments/telco-offers.yaml: what a customer who takes the offer pays.
PRICE = {
    "data-1gb": 5.0,
    "data-5gb": 15.0,
    "data-20gb": 40.0,
    "voice-100": 4.0,
    "voice-unlimited": 20.0,
    "roaming-week": 12.0,
    "family-bundle": 35.0,
}
GENDER_FACTOR = {"female": {"roaming-week": 1.3}, "male": {"data-20gb": 1.2}}


def age_band(age: int) -> str:
    return AGE_LABELS[sum(1 for edge in AGE_EDGES if age >= edge)]


def _eligible(offer: str, age: int, trips: int) -> bool:
    # The deployment's eligibility rules: roaming needs a traveller, the family bundle an adult.
    if offer == "roaming-week":
        return trips >= 1
    if offer == "family-bundle":
        return age >= 25
    return True


def sample_data() -> dict[str, str]:
    """File name -> CSV text."""
    rng = random.Random(SEED)
    customers = io.StringIO()
    customers.write("customer,age,gender,trips_per_year,signup_time\n")
    people: list[tuple[str, int, str, int]] = []
    for number in range(1, CUSTOMERS + 1):
        customer = f"c{number:04d}"
        age = max(18, min(85, int(rng.gauss(41, 14))))
        gender = rng.choice(("female", "male"))
        trips = min(12, int(rng.expovariate(0.5)))
        signup = START - timedelta(days=rng.randrange(30, 1500), seconds=rng.randrange(86400))
        customers.write(f"{customer},{age},{gender},{trips},{signup.isoformat().replace('+00:00', 'Z')}\n")
        people.append((customer, age, gender, trips))
    history = io.StringIO()
    history.write("customer,offer,accepted,channel,age_band,gender,presented_at\n")
    events = io.StringIO()
    events.write("customer,event_time,offer,accepted,amount\n")
    offers = list(TAKE_UP)
    for index in range(PRESENTATIONS):
        customer, age, gender, trips = rng.choice(people)
        offer = rng.choice([o for o in offers if _eligible(o, age, trips)])
        band = age_band(age)
        rate = TAKE_UP[offer] * AGE_FACTOR[band].get(offer, 1.0) * GENDER_FACTOR[gender].get(offer, 1.0)
        channel = CHANNELS[0] if rng.random() < 0.7 else CHANNELS[1]
        rate *= 1.2 if channel == "app" else 0.8
        accepted = 1 if rng.random() < min(rate, 0.95) else 0
        moment = START + timedelta(seconds=index * 600 + rng.randrange(600))
        history.write(
            f"{customer},{offer},{accepted},{channel},{band},{gender},"
            f"{moment.isoformat().replace('+00:00', 'Z')}\n"
        )
        events.write(
            f"{customer},{moment.isoformat().replace('+00:00', 'Z')},{offer},{accepted},"
            f"{PRICE[offer] if accepted else 0.0:.2f}\n"
        )
    return {
        "customers.csv": customers.getvalue(),
        "history.csv": history.getvalue(),
        "events.csv": events.getvalue(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="Directory to write (default examples/data)"
    )
    parser.add_argument("--check", action="store_true", help="Only report whether the files are up to date")
    args = parser.parse_args(argv)
    stale = []
    for name, text in sample_data().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} ({text.count(chr(10)) - 1} rows, {len(text.encode())} bytes)")
    if stale:
        print(f"out of date (run python tools/make_sample_data.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
