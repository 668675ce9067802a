defmodule LMPort.PoolDistributionTest do
  @moduledoc """
  A pool on another BEAM node: the test makes this node distributed (loopback only, epmd started if needed),
  starts a peer node with `:peer`, starts a pool there in a `:pg` group and calls it from here.
  """
  use ExUnit.Case, async: false

  @moduletag timeout: 300_000
  @moduletag capture_log: true
  @group :lmport_distribution_test
  @engine [dtype: "float32", max_model_len: 256, kv_cache_memory_bytes: 32 * 1024 * 1024]

  setup_all do
    distribute!()
    {:ok, peer, node} = start_peer()

    on_exit(fn ->
      :erpc.call(node, Application, :stop, [:lmport], 60_000)
      :peer.stop(peer)
    end)

    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:lmport])

    pool_opts = [
      name: LMPort.PoolDistributionTest.RemotePool,
      size: 1,
      group: @group,
      env: [{"OMP_NUM_THREADS", "1"}],
      worker_args: ["--log-level", "WARNING"]
    ]

    {:ok, _} =
      :erpc.call(node, Supervisor, :start_child, [LMPort.Supervisor, {LMPort.Pool, pool_opts}], 120_000)

    %{node: node}
  end

  # This node, distributed on 127.0.0.1 only (no other interface is listened on).
  defp distribute! do
    unless Node.alive?() do
      # a second epmd exits at once when one already runs
      {_, 0} = System.cmd("epmd", ["-daemon"], env: [{"ERL_EPMD_ADDRESS", "127.0.0.1"}])
      await_epmd(50)
      :ok = :application.set_env(:kernel, :inet_dist_use_interface, {127, 0, 0, 1})
      {:ok, _} = Node.start(:"lmport_test_#{System.unique_integer([:positive])}@127.0.0.1", :longnames)
    end
  end

  # `epmd -daemon` returns before the daemon listens: Node.start would then fail with econnrefused.
  defp await_epmd(0), do: flunk("epmd did not start listening on 127.0.0.1")

  defp await_epmd(tries) do
    case System.cmd("epmd", ["-names"], stderr_to_stdout: true) do
      {_, 0} -> :ok
      _ -> Process.sleep(100) && await_epmd(tries - 1)
    end
  end

  # Not linked: the setup_all process ends before the tests run; on_exit stops it.
  defp start_peer do
    {:ok, peer, node} =
      :peer.start(%{
        name: :"lmport_peer_#{System.unique_integer([:positive])}",
        host: ~c"127.0.0.1",
        longnames: true,
        args: [
          ~c"-setcookie",
          Atom.to_charlist(Node.get_cookie()),
          ~c"-kernel",
          ~c"inet_dist_use_interface",
          ~c"{127,0,0,1}"
        ]
      })

    :ok = :erpc.call(node, :code, :add_paths, [:code.get_path()])
    {:ok, peer, node}
  end

  test "a caller on this node runs on the other node's workers", %{node: node} do
    LMPort.TestHelpers.wait_until(fn -> LMPort.Pool.members(@group) != [] end, 10_000, "the :pg group")
    pool = LMPort.Pool.pick(@group)
    assert node(pool) == node
    assert [worker] = LMPort.Pool.workers(pool)
    assert node(worker) == node

    llm = LMPort.llm!({:pool, pool}, "smollm2", @engine)

    assert [out] =
             LMPort.generate!({:pool, pool}, llm, "The capital of France is", sampling_params: [max_tokens: 4])

    assert length(hd(out["outputs"])["token_ids"]) == 4

    # a stream's chunks travel back as messages between the nodes
    chunks =
      LMPort.generate!({:pool, pool}, llm, "Once upon a time", stream: true, sampling_params: [max_tokens: 4])
      |> Enum.to_list()

    assert chunks |> Enum.flat_map(&hd(&1["outputs"])["token_ids"]) |> length() == 4
    assert LMPort.stats!(worker)["service"]["requests_total"] >= 3
  end
end
