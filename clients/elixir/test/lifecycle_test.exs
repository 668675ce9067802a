defmodule LMPort.LifecycleTest do
  @moduledoc "Crash, restart and shutdown: no worker process may outlive its GenServer."
  use ExUnit.Case, async: false
  import LMPort.TestHelpers

  @moduletag timeout: 300_000
  @moduletag capture_log: true

  test "SIGKILL of the worker: pending callers get errors, the supervisor restarts it, the next call works" do
    name = LMPort.LifecycleTest.Crashy
    start_supervised!({LMPort.Worker, worker_opts(name: name)})
    llm = LMPort.llm!(name, "smollm2", kv_cache_memory_bytes: 256 * 1024 * 1024, max_model_len: 2048)
    old = GenServer.whereis(name)
    %{"os_pid" => os_pid, "pgid" => pgid} = LMPort.Worker.info(name)

    callers =
      for i <- 1..3 do
        Task.async(fn ->
          LMPort.generate(name, llm, "Story #{i}:", sampling_params: [max_tokens: 1_000, ignore_eos: true])
        end)
      end

    wait_until(fn -> LMPort.stats!(name, llm: llm)["num_running"] == 3 end, 30_000, "3 running requests")
    System.cmd("kill", ["-KILL", "#{os_pid}"])

    for result <- Task.await_many(callers, 10_000) do
      assert {:error, %LMPort.Error{code: "worker_exited", message: message}} = result
      assert message =~ "exited"
    end

    new = wait_until(fn -> (pid = GenServer.whereis(name)) && pid != old && pid end, 30_000, "the restart")
    assert %{"os_pid" => new_os_pid} = LMPort.Worker.info(new)
    assert new_os_pid != os_pid
    wait_until(fn -> not group_alive?(pgid) end, 5_000, "the old process group to be gone")
    assert {:ok, %{"n" => 5}} = LMPort.ping(name, n: 5)
    assert {:error, %LMPort.Error{code: "not_found"}} = LMPort.tokenize(name, llm, "x")
  end

  test "stopping the application leaves no worker process behind" do
    on_exit(fn ->
      Application.delete_env(:lmport, :workers)
      Application.ensure_all_started(:lmport)
    end)

    :ok = Application.stop(:lmport)
    Application.put_env(:lmport, :workers, [worker_opts(name: LMPort.LifecycleTest.AppWorker)])
    {:ok, _} = Application.ensure_all_started(:lmport)
    %{"pgid" => pgid} = LMPort.Worker.info(LMPort.LifecycleTest.AppWorker)
    assert {:ok, %{"status" => "ok"}} = LMPort.health(LMPort.LifecycleTest.AppWorker)
    assert group_alive?(pgid)
    :ok = Application.stop(:lmport)
    refute group_alive?(pgid)
  end

  test "run/2 stops its worker when the function returns or raises" do
    {pgid, pong} =
      LMPort.run(fn w -> {LMPort.Worker.info(w)["pgid"], LMPort.ping!(w, n: 1)} end, worker_opts())

    assert %{"n" => 1} = pong
    refute group_alive?(pgid)

    test_pid = self()

    assert_raise RuntimeError, "boom", fn ->
      LMPort.run(
        fn w -> send(test_pid, {:pgid, LMPort.Worker.info(w)["pgid"]}) && raise "boom" end,
        worker_opts()
      )
    end

    assert_received {:pgid, pgid}
    refute group_alive?(pgid)
  end
end
