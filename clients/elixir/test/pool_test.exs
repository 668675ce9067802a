defmodule LMPort.PoolTest do
  @moduledoc "LMPort.Pool with 3 real workers on the bundled model."
  use ExUnit.Case, async: false
  import LMPort.TestHelpers

  @moduletag timeout: 300_000
  @moduletag capture_log: true
  @pool LMPort.PoolTest.Pool
  @engine [dtype: "float32", max_model_len: 256, kv_cache_memory_bytes: 32 * 1024 * 1024]
  @prompt "The capital of France is"
  @short [max_tokens: 4, temperature: 0]

  setup_all do
    start_supervised!({LMPort.Pool, worker_opts(name: @pool, size: 3)})
    %{llm: LMPort.llm!({:pool, @pool}, "smollm2", @engine)}
  end

  # Each worker's service request counter, by place.
  defp requests_per_worker,
    do: for(pid <- LMPort.Pool.workers(@pool), do: LMPort.stats!(pid)["service"]["requests_total"])

  # One greedy generation per worker at once: least-loaded routing gives each worker one.
  defp one_per_worker(llm) do
    1..3
    |> Enum.map(fn _ -> Task.async(fn -> generate_text(llm) end) end)
    |> Task.await_many(60_000)
  end

  defp generate_text(llm) do
    [out] = LMPort.generate!({:pool, @pool}, llm, @prompt, sampling_params: @short)
    hd(out["outputs"])["text"]
  end

  defp all_up?, do: Enum.all?(LMPort.Pool.workers(@pool), &is_pid/1)

  test "the pool-wide handle works on every worker", %{llm: llm} do
    assert "pool-llm-" <> _ = llm["ref"]
    before = requests_per_worker()
    texts = one_per_worker(llm)

    # each worker answered the generate and the first stats call (and maybe a lazy llm): the handle resolved on
    # all three
    assert Enum.all?(Enum.zip_with(requests_per_worker(), before, &(&1 - &2)), &(&1 >= 2))
    assert length(Enum.uniq(texts)) == 1
    assert [_ | _] = LMPort.tokenize!({:pool, @pool}, llm, "Paris")
  end

  test "a ref the pool did not make is refused, naming the field" do
    assert {:error, %LMPort.Error{code: "not_found", details: %{"field" => "llm"}}} =
             LMPort.generate({:pool, @pool}, "llm-1", @prompt)
  end

  test "killing one of 3 workers under load loses no unstarted call; the worker is restarted", %{llm: llm} do
    # every worker loads the handle first (a restarted one does it lazily): the streams start together
    wait_until(&all_up?/0, 120_000, "every worker")
    one_per_worker(llm)
    victim = Enum.at(LMPort.Pool.workers(@pool), 1)
    restarts = LMPort.Pool.restarts(@pool)
    %{"pgid" => pgid} = LMPort.Worker.info(victim)
    parent = self()
    busy = [max_tokens: 64, ignore_eos: true, temperature: 0]

    # two streams per worker; each reports its first chunk (it had started)
    streams =
      for i <- 1..6 do
        Task.async(fn ->
          try do
            LMPort.generate!({:pool, @pool}, llm, @prompt, sampling_params: busy, stream: true)
            |> Stream.with_index()
            |> Enum.each(fn {_, n} -> if n == 0, do: send(parent, {:started, i}) end)
          rescue
            e in LMPort.Error -> {:error, e}
          end
        end)
      end

    for i <- 1..6, do: assert_receive({:started, ^i}, 60_000)
    System.cmd("kill", ["-KILL", "--", "-#{pgid}"])

    wait_until(
      fn -> Enum.at(LMPort.Pool.workers(@pool), 1) != victim end,
      10_000,
      "the pool to see the death"
    )

    # calls made while the worker is down (dead, then restarting) had not started anywhere: none may be lost
    later = for _ <- 1..6, do: Task.async(fn -> generate_text(llm) end)
    outcomes = Task.await_many(streams, 60_000)

    assert [%LMPort.Error{code: "worker_exited"}, %LMPort.Error{code: "worker_exited"}] =
             for({:error, e} <- outcomes, do: e)

    assert Enum.all?(Task.await_many(later, 60_000), &is_binary/1)

    wait_until(&all_up?/0, 120_000, "worker 1 to be restarted")
    assert LMPort.Pool.restarts(@pool) == restarts + 1
    before = requests_per_worker()
    texts = one_per_worker(llm)
    # the restarted worker loaded the handle's model lazily and served its call
    assert Enum.at(requests_per_worker(), 1) - Enum.at(before, 1) >= 2
    assert length(Enum.uniq(texts)) == 1
  end

  test "a worker killed while it loads the handle for a call: the call is served by another worker", %{
    llm: llm
  } do
    idle = Enum.at(LMPort.Pool.workers(@pool), 2)
    %{"pgid" => pgid} = LMPort.Worker.info(idle)
    System.cmd("kill", ["-KILL", "--", "-#{pgid}"])
    wait_until(fn -> all_up?() and Enum.at(LMPort.Pool.workers(@pool), 2) != idle end, 120_000, "the restart")
    # the fresh worker has not loaded the handle's model: one of these calls waits for that load
    fresh = Enum.at(LMPort.Pool.workers(@pool), 2)
    calls = for _ <- 1..3, do: Task.async(fn -> generate_text(llm) end)
    # a load imports torch and reads the weights (seconds): 200 ms in, it is still running
    Process.sleep(200)
    %{"pgid" => fresh_pgid} = LMPort.Worker.info(fresh)
    System.cmd("kill", ["-KILL", "--", "-#{fresh_pgid}"])
    assert Enum.all?(Task.await_many(calls, 120_000), &is_binary/1)
    wait_until(&all_up?/0, 120_000, "the second restart")
  end

  test "release frees the handle on every worker" do
    extra = LMPort.llm!({:pool, @pool}, "smollm2", @engine)
    assert %{"ref" => ref} = LMPort.release!({:pool, @pool}, extra)
    assert ref == extra["ref"]

    assert {:error, %LMPort.Error{code: "not_found"}} =
             LMPort.generate({:pool, @pool}, extra, @prompt, sampling_params: @short)
  end
end
