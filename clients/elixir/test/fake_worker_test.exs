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
end
