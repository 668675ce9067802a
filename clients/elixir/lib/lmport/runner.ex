defmodule LMPort.Runner do
  @moduledoc false
  # LMPort.run/2: a worker for the length of one function, like VLLM.run/2, stopped cleanly whatever happens.

  @spec run((LMPort.Worker.server() -> result), keyword) :: result when result: term
  def run(fun, opts) when is_function(fun, 1) do
    # Unlinked (a worker crash returns errors to `fun` instead of killing the script), but owned: if this
    # process is killed the worker stops too; a normal return or an exception stops it in `after`.
    case GenServer.start(LMPort.Worker, Keyword.put(opts, :owner, self())) do
      {:ok, worker} ->
        try do
          fun.(worker)
        after
          if Process.alive?(worker), do: LMPort.Worker.stop(worker)
        end

      {:error, %LMPort.Error{} = error} ->
        raise error

      {:error, reason} ->
        raise LMPort.Error.new("spawn_failed", "cannot start the lmport worker: #{inspect(reason)}")
    end
  end
end
