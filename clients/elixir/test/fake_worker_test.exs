defmodule LMPort.FakeWorkerTest do
  @moduledoc "Protocol edge cases against a scripted stand-in for the worker (`fake_worker/1`): fast, no model."
  use ExUnit.Case, async: true
  import LMPort.TestHelpers

  @moduletag capture_log: true

  defp start(scenario, opts \\ []) do
    start_supervised!({LMPort.Worker, Keyword.merge([python: fake_worker(scenario), grace_ms: 300], opts)},
      restart: :temporary
    )
  end

  test "a timeout beyond Erlang's timer range (2^32 - 1 ms) is a long deadline, not a crash" do
    worker =
      start("""
      hello()
      request = recv()
      respond(request, {"timeout_ms": request["timeout_ms"]})
      recv()
      """)

    # the worker takes up to 2^53 - 1 ms; Erlang timers raise badarg far below that
    assert {:ok, %{"timeout_ms" => 1_125_899_906_842_624}} =
             LMPort.Worker.call(worker, "ping", %{}, timeout: 2 ** 50)

    assert Process.alive?(worker)
  end

  test "params that cannot be encoded are the caller's error; the GenServer keeps serving" do
    worker =
      start("""
      hello()
      while True:
          respond(recv(), {"n": 1})
      """)

    for params <- [%{"n" => [1 | 2]}, %{"n" => <<0xFF>>}, %{"n" => {:tuple}}] do
      assert {:error, %LMPort.Error{code: "invalid_params", details: %{"field" => "params"}}} =
               LMPort.Worker.call(worker, "ping", params)
    end

    assert {:ok, %{"n" => 1}} = LMPort.Worker.call(worker, "ping", %{})
  end

  test "a raw call's client-side deadline follows the method's own profile, as the worker's does" do
    # the worker would give generate its ml_inference deadline (10 s); "default" (100 ms) + grace is too short
    worker =
      start(
        """
        hello(timeout_profiles={"default": 100, "streaming": 10000, "ml_inference": 10000, "batch_job": 10000})
        request = recv()
        time.sleep(0.6)
        respond(request, {"method": request["method"]})
        recv()
        """,
        grace_ms: 100
      )

    assert {:ok, %{"method" => "generate"}} = LMPort.Worker.call(worker, "generate", %{})
  end

  describe "client-only codes, the same in every client (docs/protocol.md)" do
    setup do
      Process.flag(:trap_exit, true)
      :ok
    end

    test "a worker that speaks another protocol version: protocol_mismatch" do
      for hello <- ["hello(protocol=2)", "hello(protocol=None)"] do
        assert {:error, %LMPort.Error{code: "protocol_mismatch", message: message}} =
                 LMPort.Worker.start_link(python: fake_worker(hello <> "\nrecv()"))

        assert message =~ "this client speaks 1"
      end
    end

    test "an unreadable frame: protocol_error for every pending call, the worker is killed" do
      worker =
        start("""
        hello()
        recv()
        recv()
        send_raw(b"\\xc1")
        time.sleep(60)
        """)

      %{"os_pid" => os_pid} = LMPort.Worker.info(worker)
      ref = Process.monitor(worker)
      pending = for _ <- 1..2, do: Task.async(fn -> LMPort.Worker.call(worker, "ping", %{}) end)

      for result <- Task.await_many(pending) do
        assert {:error, %LMPort.Error{code: "protocol_error", message: message}} = result
        assert message =~ "unreadable frame"
      end

      assert_receive {:DOWN, ^ref, :process, _, {:shutdown, :protocol_error}}, 5_000
      assert {_, 1} = System.cmd("kill", ["-0", "#{os_pid}"], stderr_to_stdout: true)
    end

    test "a stream chunk out of order: protocol_error in the consumer, the request is cancelled" do
      worker =
        start("""
        hello()
        request = recv()
        send(type="chunk", id=request["id"], seq=0, data={"n": 0})
        send(type="chunk", id=request["id"], seq=2, data={"n": 2})
        send(type="chunk", id=request["id"], seq=3, data={"n": 3})
        cancel = recv()
        ping = recv()
        respond(ping, {"cancelled": cancel == {"type": "cancel", "id": request["id"]}})
        recv()
        """)

      seen = :ets.new(:seen, [:public])

      assert_raise LMPort.Error, ~r/\[protocol_error\] stream chunk seq 2, expected 1/, fn ->
        LMPort.Worker.stream(worker, "generate", %{}) |> Enum.each(&:ets.insert(seen, {&1["n"]}))
      end

      assert :ets.tab2list(seen) == [{0}]
      assert {:ok, %{"cancelled" => true}} = LMPort.Worker.call(worker, "ping", %{})
      refute_received {:lmport, _, _, _}
    end
  end

  # A pool of two fakes: the first to start answers every request with `error` (a Python dict literal), the other
  # with its pid. Returns the pool's name and a function listing the methods the refuser answered.
  defp pool_with_a_refuser(error) do
    lock = Path.join(System.tmp_dir!(), "lmport-pool-#{System.unique_integer([:positive])}")
    on_exit(fn -> File.rm(lock) end)
    name = :"pool_#{System.unique_integer([:positive])}"
    fake = fake_worker("refuse_if_first(#{inspect(lock)}, #{error})\n")
    start_supervised!({LMPort.Pool, name: name, size: 2, python: fake, grace_ms: 300})
    {name, fn -> lock |> File.read!() |> String.split() end}
  end

  defp ping_both(pool),
    do: [1, 2] |> Enum.map(fn _ -> Task.async(fn -> LMPort.ping({:pool, pool}) end) end) |> Task.await_many()

  test "pool: a call answered overloaded is retried on the other worker" do
    {pool, refused} = pool_with_a_refuser(~s({"code": "overloaded", "message": "full", "retryable": True}))
    assert [{:ok, %{"pid" => pid}}, {:ok, %{"pid" => pid}}] = ping_both(pool)
    assert ["ping" | _] = refused.()
  end

  test "pool: shutting_down after engine work (details.usage) is not retried" do
    {pool, refused} =
      pool_with_a_refuser(
        ~s({"code": "shutting_down", "message": "stopping", "retryable": True, "details": {"usage": {"total_tokens": 4}}})
      )

    assert [{:error, %LMPort.Error{code: "shutting_down"}}] = for({:error, _} = e <- ping_both(pool), do: e)
    assert refused.() == ["ping"]
  end
end
