defmodule LMPort.Python do
  @moduledoc """
  Finds the Python interpreter that runs the worker: the `:python` option, then the `LMPORT_PYTHON`
  environment variable, then `.venv/bin/python` in the current directory, then the `.venv` of the lmport
  checkout this client was built from (`clients/elixir` lives inside it).
  """

  # The repository root when the client is used from its checkout (clients/elixir/lib/lmport -> root).
  @checkout_root Path.expand("../../../..", __DIR__)

  @doc "The lmport checkout holding `lmport/bridge/worker.py`, if this client was built from one."
  @spec checkout_root() :: String.t() | nil
  def checkout_root do
    if File.regular?(Path.join(@checkout_root, "lmport/bridge/worker.py")), do: @checkout_root
  end

  @doc "Returns `{:ok, path}` of the first usable interpreter, or `{:error, %LMPort.Error{}}` listing what was tried."
  @spec find(keyword) :: {:ok, String.t()} | {:error, LMPort.Error.t()}
  def find(opts \\ []) do
    candidates =
      [
        {":python option", opts[:python]},
        {"LMPORT_PYTHON", System.get_env("LMPORT_PYTHON")},
        {"./.venv", Path.expand(".venv/bin/python")},
        {"lmport checkout .venv", checkout_root() && Path.join(checkout_root(), ".venv/bin/python")}
      ]
      |> Enum.reject(fn {_, path} -> path in [nil, ""] end)

    # An explicit choice that does not work is an error, not a reason to fall back silently.
    case Enum.find(candidates, fn {source, _} -> source in [":python option", "LMPORT_PYTHON"] end) do
      {source, path} -> check(source, path)
      nil -> first_usable(candidates)
    end
  end

  defp first_usable(candidates) do
    case Enum.find(candidates, fn {_, path} -> executable?(path) end) do
      {_, path} ->
        {:ok, path}

      nil ->
        tried = Enum.map_join(candidates, ", ", fn {source, path} -> "#{source} (#{path})" end)

        {:error,
         LMPort.Error.new(
           "spawn_failed",
           "no Python interpreter for the lmport worker; tried #{tried}. " <>
             "Pass python: \"/path/to/python\" or set LMPORT_PYTHON to a Python with lmport installed"
         )}
    end
  end

  defp check(source, path) do
    resolved = if String.contains?(path, "/"), do: Path.expand(path), else: System.find_executable(path)

    if resolved && executable?(resolved),
      do: {:ok, resolved},
      else:
        {:error,
         LMPort.Error.new(
           "spawn_failed",
           "#{source} points at #{inspect(path)}, which is not an executable file"
         )}
  end

  defp executable?(path) do
    case File.stat(path) do
      {:ok, %File.Stat{type: :regular, mode: mode}} -> Bitwise.band(mode, 0o111) != 0
      _ -> false
    end
  end
end
