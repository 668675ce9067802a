defmodule LMPort.ProcessGroup do
  @moduledoc """
  Signals to a worker's process group with kill(1). The worker leads its own group (Erlang ports start
  their child in a new session, and the worker calls `setsid` otherwise), so killing `-pgid` reaches the
  worker and everything it started. A group that is not the worker's own (a worker run with `--no-setsid`
  shares ours) is never signalled: only the worker's pid is.
  """

  @doc "Sends `sig` (\"TERM\", \"KILL\", ...) to the worker's group, or to `os_pid` alone when the group is not its own."
  @spec signal(integer | nil, integer | nil, String.t()) :: :ok
  def signal(pgid, os_pid, sig) do
    case own_group(pgid, os_pid) do
      nil when is_integer(os_pid) -> kill(["-#{sig}", "#{os_pid}"])
      nil -> :ok
      group -> kill(["-#{sig}", "--", "-#{group}"])
    end
  end

  @doc "Is any process left in group `pgid`?"
  @spec alive?(integer) :: boolean
  def alive?(pgid), do: match?({_, 0}, System.cmd("kill", ["-0", "--", "-#{pgid}"], stderr_to_stdout: true))

  @doc "After the worker exited: TERM, then KILL, whatever is left of its group (children it failed to reap)."
  @spec kill_leftovers(integer | nil, integer | nil) :: :ok
  def kill_leftovers(pgid, os_pid) do
    if own_group(pgid, os_pid) && alive?(pgid) do
      signal(pgid, os_pid, "TERM")
      Process.sleep(200)
      if alive?(pgid), do: signal(pgid, os_pid, "KILL")
    end

    :ok
  end

  defp kill(args) do
    System.cmd("kill", args, stderr_to_stdout: true)
    :ok
  end

  defp own_group(pgid, os_pid) when is_integer(pgid) and pgid > 1 do
    if pgid == os_pid or pgid != beam_pgid(), do: pgid
  end

  defp own_group(_pgid, _os_pid), do: nil

  defp beam_pgid do
    with {:ok, stat} <- File.read("/proc/self/stat"),
         [_, after_comm] <- String.split(stat, ") ", parts: 2),
         [_state, _ppid, pgrp | _] <- String.split(after_comm, " ") do
      String.to_integer(pgrp)
    else
      _ -> nil
    end
  end
end
