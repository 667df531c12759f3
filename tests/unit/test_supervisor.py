from libs.stack.supervisor import FIRST_DELAY_SECONDS, MAX_DELAY_SECONDS, STABLE_SECONDS, Backoff


def test_a_process_that_keeps_exiting_waits_longer_each_time_and_a_stable_one_restarts_at_once() -> None:
    backoff = Backoff()
    backoff.exited(now=100.0, ran_for=STABLE_SECONDS + 1)
    assert (backoff.delay, backoff.not_before) == (0.0, 100.0)  # ran long enough: at once
    delays = []
    for _ in range(8):
        backoff.exited(now=200.0, ran_for=1.0)  # exits right after each start
        delays.append(backoff.delay)
    assert delays[:3] == [FIRST_DELAY_SECONDS, 2 * FIRST_DELAY_SECONDS, 4 * FIRST_DELAY_SECONDS]
    assert delays[-1] == MAX_DELAY_SECONDS
    assert backoff.not_before == 200.0 + MAX_DELAY_SECONDS
    backoff.exited(now=300.0, ran_for=STABLE_SECONDS)
    assert backoff.delay == 0.0
