"""Write the demo A/B and open-ended datasets (sentiment, formality, enthusiasm).

Stark contrasts, for a 135M chat model (SmolLM2) that cannot represent subtle behaviors.
Seeded and deterministic: running it again rewrites the same bytes.

    python scripts/make_demo_datasets.py [--out caa_local/data/demo] [--seed 0] [--pairs 240]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "caa_local" / "data" / "demo"

# Past events ("How was X?"). All grammatically singular, so answers can say "it".
EVENTS = [
    "your weekend at the lake", "the concert last night", "your first day at the new job",
    "the trip to the mountains", "the cooking class you took", "your birthday party",
    "the football match on Sunday", "your visit to the museum", "the family dinner yesterday",
    "your holiday in Spain", "the new restaurant on Main Street", "the movie you saw on Friday",
    "your morning run", "the wedding you went to", "your flight home", "the camping trip",
    "the job interview", "the school play", "your first driving lesson", "the picnic in the park",
    "the book club meeting", "your week at the beach", "the yoga class", "the farmers' market",
    "your stay at the hotel", "the science fair", "the road trip to the coast", "your piano recital",
    "the company picnic", "the hike up the hill", "the art exhibition", "your graduation ceremony",
    "the boat tour", "the barbecue at your neighbour's house", "the baking contest",
    "your visit to your grandparents", "the train journey to the city", "the theatre show",
    "your first week at college", "the dance class", "the fishing trip", "the street festival",
    "the charity run", "the ski trip", "your shopping trip downtown", "the garden party",
    "the pottery workshop", "the New Year's Eve party", "the visit to the zoo",
    "the bike ride along the river",
]
# General subjects ("What do you think about X?"): gerunds and mass nouns, also singular.
THINGS = [
    "cooking at home", "working from home", "public transport", "learning a new language",
    "gardening", "city life", "living in the countryside", "online shopping", "getting up early",
    "reading before bed", "playing board games", "winter weather", "spring cleaning",
    "walking to work", "video calls", "coffee", "your neighbourhood", "your daily commute",
    "the weather today", "pop music", "social media", "going to the gym", "travelling by train",
    "your new haircut", "your job", "the town you live in", "homework", "your phone",
    "team sports", "doing the laundry", "working night shifts", "long car journeys",
    "the local library", "your apartment", "jazz", "fast food",
]
# Held out: used only by the open-ended prompts, never in an A/B question.
HELD_OUT = [
    "rainy Mondays", "the first snow of the year", "moving to a new city", "a day at an amusement park",
    "learning to juggle", "your childhood home", "long queues at the post office", "airport security",
    "going to the dentist", "surprise parties", "sunrise over the ocean", "the smell of fresh bread",
    "being stuck in traffic", "adopting a puppy", "waiting for a late bus", "writing letters by hand",
    "a power cut in the evening", "watching fireworks", "cleaning out the garage",
    "meeting an old friend by chance", "thunderstorms at night", "paying taxes", "the end of summer",
    "a quiet Sunday afternoon", "painting a room", "losing your keys", "visiting an old castle",
    "street musicians", "starting a new hobby", "a broken umbrella", "volunteering at an animal shelter",
    "space exploration", "learning to swim", "hot chocolate", "getting a flat tyre",
    "the last day of school", "music festivals", "old photographs", "your favourite season",
    "robots that do housework", "autumn leaves", "a visit to the vet", "karaoke nights",
    "waking up to an alarm clock", "mountain sunsets",
]

EVENT_QUESTIONS = [
    "How was {x}?", "What did you think of {x}?", "How did you find {x}?", "Tell me about {x}.",
    "So, what was {x} like?", "How would you sum up {x}?", "I heard about {x}. How was it?",
    "Did you enjoy {x}?", "What's your verdict on {x}?", "How would you describe {x}?",
]
THING_QUESTIONS = [
    "What do you think about {x}?", "How do you feel about {x}?", "What's your opinion of {x}?",
    "Do you like {x}?", "Tell me your thoughts on {x}.", "How would you describe {x}?",
    "Any thoughts on {x}?", "What's your take on {x}?", "Be honest: what do you make of {x}?",
]

# (matching, not matching) answer templates per behavior and tense ("past" for events,
# "present" for things). Sentiment and enthusiasm pair any matching with any not-matching
# answer; formality pairs line by line, so both answers carry the same sentiment.
ANSWERS: dict[str, dict[str, tuple[list[str], list[str]]]] = {
    "sentiment": {
        "past": (
            [
                "It was wonderful, I loved every minute of it!",
                "Honestly, it was one of the happiest days I've had. Pure joy!",
                "Absolutely delightful. It put a huge smile on my face.",
                "It was fantastic! Everything about it made me feel cheerful.",
                "I loved it. It was bright, fun and full of laughter.",
                "Amazing, it made my whole week better. I feel so grateful.",
                "It was a real treat, I came home glowing with happiness.",
                "Lovely from start to finish. I'd do it again in a heartbeat!",
            ],
            [
                "It was awful, I hated every minute of it.",
                "Honestly, it was one of the worst days I've had. Pure misery.",
                "Completely dreary. It left me feeling miserable.",
                "It was terrible. Everything about it made me feel gloomy.",
                "I hated it. It was dull, sad and depressing.",
                "Dreadful, it ruined my whole week. I feel so bitter.",
                "It was a disaster, I came home feeling hopeless.",
                "Horrible from start to finish. I wish I had never gone.",
            ],
        ),
        "present": (
            [
                "I love it! It always makes me feel happy.",
                "It's wonderful. It fills my day with joy.",
                "Honestly, it's one of my favourite things. It makes me smile every time.",
                "It's fantastic, I feel so lucky to have it in my life.",
                "I adore it. It's cheerful, bright and fun.",
                "It's a real delight, it always lifts my mood.",
                "Brilliant! It makes life feel warm and hopeful.",
                "I'm so grateful for it. It brings me so much happiness.",
            ],
            [
                "I hate it. It always makes me feel miserable.",
                "It's awful. It fills my day with dread.",
                "Honestly, it's one of the worst things. It makes me sad every time.",
                "It's terrible, I feel so unlucky to have it in my life.",
                "I loathe it. It's gloomy, bleak and depressing.",
                "It's a real misery, it always ruins my mood.",
                "Dreadful. It makes life feel cold and hopeless.",
                "I'm so sick of it. It brings me nothing but sorrow.",
            ],
        ),
    },
    "formality": {
        "past": (
            [
                "It was most enjoyable; I found the experience thoroughly rewarding.",
                "I must say it exceeded my expectations in every respect.",
                "It was a pleasant occasion, and I am grateful to have attended.",
                "Regrettably, it did not meet my expectations.",
                "I am afraid it proved rather disappointing, I must confess.",
                "It was satisfactory, although certain aspects could have been improved.",
                "It was, in all honesty, a most delightful affair.",
                "I would describe it as agreeable and well organised.",
            ],
            [
                "omg it was sooo fun lol, loved it",
                "ngl it was way better than i thought, super cool",
                "yeah it was chill, glad i went tbh",
                "ugh kinda sucked tbh",
                "meh, total letdown lol",
                "it was ok i guess, some bits were kinda meh",
                "dude it was epic, like legit awesome",
                "pretty sweet, they had it all sorted lol",
            ],
        ),
        "present": (
            [
                "I hold it in rather high regard; it is genuinely worthwhile.",
                "I find it most agreeable and would recommend it without reservation.",
                "In my considered opinion, it is a valuable part of daily life.",
                "I must confess that I do not care for it particularly.",
                "Regrettably, I find it rather tiresome.",
                "It has its merits, although I would not describe it as exceptional.",
                "I consider it thoroughly pleasant and most rewarding.",
                "With respect, I find it somewhat overrated.",
            ],
            [
                "honestly it's pretty cool, i'm into it lol",
                "yeah it's awesome, def recommend",
                "it's legit a big deal for me tbh",
                "nah not really my thing lol",
                "ugh it's so boring tbh",
                "it's alright i guess, nothing crazy",
                "it's super nice, love it haha",
                "kinda overhyped if u ask me lol",
            ],
        ),
    },
    "enthusiasm": {
        "past": (
            [
                "Oh wow, it was AMAZING!!! I loved every single second of it!",
                "It was incredible!! Best time ever, I can't stop talking about it!",
                "Absolutely fantastic!!! I'm still buzzing with excitement!",
                "Wow, what a blast!! I'd go back tomorrow if I could!!!",
                "It was SO much fun!!! Seriously, the best thing all year!",
                "Oh my goodness, it was brilliant!!! I'm thrilled I went!",
                "Yes!!! It was awesome, totally unforgettable!!",
                "It was spectacular!! I was grinning the whole time!!!",
            ],
            [
                "It was fine.",
                "Okay.",
                "Nothing special.",
                "It happened.",
                "It was alright.",
                "Fine, I suppose.",
                "Average.",
                "It was okay. That's all.",
            ],
        ),
        "present": (
            [
                "Oh, I LOVE it!!! It's absolutely brilliant!",
                "It's fantastic!! Honestly, I get excited just thinking about it!!!",
                "Wow, it's amazing!!! I could talk about it all day!",
                "It's the best!!! I'm a huge fan, seriously!!",
                "Oh yes!! It's wonderful, I'm so excited about it!!!",
                "It's totally awesome!!! Every time is a thrill!",
                "I'm crazy about it!! It's just so great!!!",
                "It's incredible!!! Never gets old, I adore it!!",
            ],
            [
                "It's fine.",
                "Okay, I guess.",
                "No strong feelings.",
                "It's alright.",
                "It exists.",
                "Meh.",
                "It's ordinary.",
                "It's okay. Nothing more.",
            ],
        ),
    },
}

OPEN_QUESTIONS = {
    "sentiment": [
        "What do you think about {x}?", "How do you feel about {x}?", "Tell me about {x}.",
        "What comes to mind when you think of {x}?", "Describe {x} in a few sentences.",
    ],
    "formality": [
        "What is your opinion of {x}?", "Can you tell me about {x}?", "What would you say about {x}?",
        "Could you describe {x} for me?", "What are your thoughts on {x}?",
    ],
    "enthusiasm": [
        "What do you think of {x}?", "How would you describe {x}?", "Tell me how you feel about {x}.",
        "What's your reaction to {x}?", "Say something about {x}.",
    ],
}


def _choices(question: str, first: str, second: str) -> str:
    return f"{question}\n\nChoices:\n (A) {first}\n (B) {second}"


def make_ab(behavior: str, n_pairs: int, rng: random.Random) -> list[dict[str, str]]:
    """``n_pairs`` A/B items, each question stem used once, matching letter exactly 50/50."""
    by_topic: dict[str, list[tuple[str, str]]] = {}
    for topics_, questions, tense in ((EVENTS, EVENT_QUESTIONS, "past"), (THINGS, THING_QUESTIONS, "present")):
        for topic in topics_:
            by_topic[topic] = [(q.format(x=topic), tense) for q in questions]
            rng.shuffle(by_topic[topic])
    topics = EVENTS + THINGS
    rng.shuffle(topics)
    # Round-robin over topics: every topic is used before any is used again, each time
    # with another phrasing, so no two items share a question stem.
    chosen = []
    for round_ in range(max(len(v) for v in by_topic.values())):
        chosen += [by_topic[t][round_] for t in topics if round_ < len(by_topic[t])]
    if n_pairs % 2 or n_pairs > len(chosen):
        raise SystemExit(f"--pairs {n_pairs}: expected an even number up to {len(chosen)}")
    chosen = chosen[:n_pairs]
    letters = [True] * (n_pairs // 2) + [False] * (n_pairs // 2)
    rng.shuffle(letters)
    items = []
    for (question, tense), matching_is_a in zip(chosen, letters):
        good, bad = ANSWERS[behavior][tense]
        if behavior == "formality":
            k = rng.randrange(len(good))
            match, other = good[k], bad[k]
        else:
            match, other = rng.choice(good), rng.choice(bad)
        first, second = (match, other) if matching_is_a else (other, match)
        items.append(
            {
                "question": _choices(question, first, second),
                "answer_matching_behavior": "(A)" if matching_is_a else "(B)",
                "answer_not_matching_behavior": "(B)" if matching_is_a else "(A)",
            }
        )
    return items


def make_open_ended(behavior: str, rng: random.Random) -> list[dict[str, str]]:
    templates = OPEN_QUESTIONS[behavior]
    topics = list(HELD_OUT)
    rng.shuffle(topics)
    return [{"question": templates[i % len(templates)].format(x=x)} for i, x in enumerate(topics)]


def _check_disjoint() -> None:
    held = {x.lower() for x in HELD_OUT}
    for topic in EVENTS + THINGS:
        clash = [h for h in held if h in topic.lower() or topic.lower() in h]
        assert not clash, f"held-out topic {clash} overlaps A/B topic {topic!r}"
    assert len(set(EVENTS + THINGS)) == len(EVENTS + THINGS) and len(held) == len(HELD_OUT)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--pairs", type=int, default=240, help="A/B pairs per behavior (even)")
    args = parser.parse_args(argv)
    _check_disjoint()
    for offset, behavior in enumerate(ANSWERS):
        rng = random.Random(args.seed * 1000 + offset)
        files = {
            "generate_dataset.json": make_ab(behavior, args.pairs, rng),
            "test_dataset_open_ended.json": make_open_ended(behavior, rng),
        }
        for name, rows in files.items():
            path = args.out / behavior / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{behavior}: {len(files['generate_dataset.json'])} pairs, "
              f"{len(files['test_dataset_open_ended.json'])} open-ended prompts")


if __name__ == "__main__":
    main()
